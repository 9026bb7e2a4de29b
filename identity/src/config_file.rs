//! Configuration files: one TOML file per process, read and parsed the same
//! way everywhere (unknown keys are refused by each type's
//! `deny_unknown_fields`), with errors that name the file and the key.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

/// Why a configuration cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("cannot read config {path}: {source}")]
    Read {
        /// The path.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The TOML is malformed, or has unknown keys or wrong types.
    #[error("invalid config {path}: {message}")]
    Parse {
        /// The path (`<inline>` for text).
        path: PathBuf,
        /// What the parser said (names the key and line).
        message: String,
    },
    /// A value is out of range or inconsistent with another.
    #[error("invalid config: {0}")]
    Invalid(String),
}

/// Reads and parses a TOML file.
pub fn load<T: DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse_at(&text, path)
}

/// Parses TOML text; errors name it `<inline>`.
pub fn parse<T: DeserializeOwned>(text: &str) -> Result<T, ConfigError> {
    parse_at(text, Path::new("<inline>"))
}

fn parse_at<T: DeserializeOwned>(text: &str, path: &Path) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|e| ConfigError::Parse {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Cfg {
        name: String,
    }

    #[test]
    fn errors_name_the_file_and_the_key() {
        assert_eq!(parse::<Cfg>("name = \"a\"\n").expect("parses").name, "a");
        let e = parse::<Cfg>("name = \"a\"\nbogus = 1\n").expect_err("unknown key");
        let m = e.to_string();
        assert!(
            m.starts_with("invalid config <inline>:") && m.contains("bogus"),
            "{m}"
        );
        let e = load::<Cfg>(Path::new("/nonexistent/meshid.toml")).expect_err("missing");
        assert!(e.to_string().contains("/nonexistent/meshid.toml"), "{e}");
    }
}
