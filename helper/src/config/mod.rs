//! The helper's configuration: TOML, or spiffe-helper's HCL with the same
//! keys, so that an existing spiffe-helper configuration works unchanged.
//!
//! Both formats decode into one [`RawConfig`] (unknown keys are refused by
//! name) and are validated into a [`HelperConfig`]. The one difference is how
//! a bare integer file mode is read: spiffe-helper's HCL writes `0644` and
//! means octal, so in HCL the digits of an integer are read as octal; TOML
//! has its own octal integers (`0o644`), taken as they are. A quoted mode
//! (`"0644"`) is octal in both.

use std::path::{Path, PathBuf};

use nix::sys::signal::Signal;
use serde::Deserialize;

mod values;

use values::{endpoint, file_name, group, mode, user};
pub use values::{parse_signal, split_args};

/// Where the Workload API is when neither the configuration nor
/// `SPIFFE_ENDPOINT_SOCKET` names it: the agent's default socket.
pub const DEFAULT_AGENT_SOCKET: &str = "/run/meshid/agent/api.sock";

/// Errors in a helper configuration.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The configuration file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this configuration.
    #[error("{path}: {message}")]
    Toml {
        /// The configuration file.
        path: PathBuf,
        /// The decoder's message (names the offending key).
        message: String,
    },
    /// The file is not valid HCL for this configuration.
    #[error("{path}: {message}")]
    Hcl {
        /// The configuration file.
        path: PathBuf,
        /// The decoder's message (names the offending key).
        message: String,
    },
    /// A value is out of range or inconsistent with another.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// Which syntax a configuration file is written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ConfigFormat {
    /// TOML (`*.toml`).
    Toml,
    /// HCL, spiffe-helper's format (any other file name, e.g. `helper.conf`).
    Hcl,
}

impl ConfigFormat {
    /// The format a file name suggests: `.toml` is TOML, anything else HCL.
    pub fn from_path(path: &Path) -> Self {
        match path.extension().and_then(|e| e.to_str()) {
            Some(e) if e.eq_ignore_ascii_case("toml") => Self::Toml,
            _ => Self::Hcl,
        }
    }
}

/// A file mode as written: an integer or a quoted octal string.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum ModeValue {
    Int(i64),
    Str(String),
}

/// `cmd_args` as spiffe-helper writes it (one string) or as a list.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum CmdArgs {
    Line(String),
    List(Vec<String>),
}

/// One `jwt_svids` element.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawJwtSvid {
    jwt_audience: String,
    #[serde(default)]
    jwt_extra_audiences: Vec<String>,
    jwt_svid_file_name: String,
}

/// The keys of a configuration file, before validation.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    agent_address: Option<String>,
    cmd: Option<String>,
    cmd_args: Option<CmdArgs>,
    pid_file_name: Option<PathBuf>,
    cert_dir: Option<PathBuf>,
    renew_signal: Option<String>,
    daemon_mode: Option<bool>,
    #[serde(default)]
    add_intermediates_to_bundle: bool,
    #[serde(default)]
    include_federated_domains: bool,
    svid_file_name: Option<String>,
    svid_key_file_name: Option<String>,
    svid_bundle_file_name: Option<String>,
    cert_file_mode: Option<ModeValue>,
    key_file_mode: Option<ModeValue>,
    jwt_bundle_file_mode: Option<ModeValue>,
    jwt_svid_file_mode: Option<ModeValue>,
    #[serde(default)]
    jwt_svids: Vec<RawJwtSvid>,
    jwt_bundle_file_name: Option<String>,
    hint: Option<String>,
    // meshid's own additions.
    svid_combined_file_name: Option<String>,
    pkcs12_file_name: Option<String>,
    pkcs12_password: Option<String>,
    file_owner: Option<String>,
    file_group: Option<String>,
}

/// A JWT-SVID kept fresh in a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtSvidFile {
    /// The audiences asked for: the first is `jwt_audience`, then the extras.
    pub audiences: Vec<String>,
    /// File name inside `cert_dir`.
    pub file_name: String,
}

/// The X.509 files written on every X.509 context update.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct X509Files {
    /// The SVID chain (leaf first) as PEM.
    pub svid: Option<String>,
    /// The SVID's private key, PKCS#8 PEM.
    pub key: Option<String>,
    /// The trust bundle as PEM (expired authorities left out).
    pub bundle: Option<String>,
    /// Chain and key in one PEM file (HAProxy, and any reader that must
    /// never see a key with another certificate).
    pub combined: Option<String>,
    /// A PKCS#12 keystore with the key, the chain and the bundle.
    pub pkcs12: Option<String>,
    /// Intermediates go into the bundle file instead of the SVID file.
    pub add_intermediates_to_bundle: bool,
    /// Federated trust domains' authorities are added to the bundle file.
    pub include_federated_domains: bool,
}

impl X509Files {
    /// Whether any X.509 file is configured.
    pub fn any(&self) -> bool {
        self.svid.is_some()
            || self.key.is_some()
            || self.bundle.is_some()
            || self.combined.is_some()
            || self.pkcs12.is_some()
    }
}

/// A validated helper configuration.
#[derive(Clone)]
pub struct HelperConfig {
    /// Workload API endpoint, `unix:///absolute/path`.
    pub agent_address: String,
    /// Program started once the first files are written, and its arguments.
    pub cmd: Option<(String, Vec<String>)>,
    /// A file holding the pid of a process to signal after each renewal.
    pub pid_file: Option<PathBuf>,
    /// The directory the files are written in.
    pub cert_dir: PathBuf,
    /// The signal sent after each renewal (default SIGHUP).
    pub renew_signal: Signal,
    /// Keep running and renewing (`false`: write once and exit).
    pub daemon_mode: bool,
    /// The X.509 files.
    pub x509: X509Files,
    /// Which SVID to write when the workload has several (by hint).
    pub hint: Option<String>,
    /// Mode of certificate and bundle files.
    pub cert_mode: u32,
    /// Mode of key files (key, combined, PKCS#12).
    pub key_mode: u32,
    /// Mode of the JWT bundle file.
    pub jwt_bundle_mode: u32,
    /// Mode of JWT-SVID files.
    pub jwt_svid_mode: u32,
    /// Password of the PKCS#12 file.
    pub pkcs12_password: String,
    /// Owner given to every written file, when set.
    pub owner: Option<nix::unistd::Uid>,
    /// Group given to every written file, when set.
    pub group: Option<nix::unistd::Gid>,
    /// JWT-SVIDs kept fresh in files.
    pub jwt_svids: Vec<JwtSvidFile>,
    /// JWT bundle file (JSON: trust domain -> base64 of its JWKS).
    pub jwt_bundle: Option<String>,
}

impl std::fmt::Debug for HelperConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The PKCS#12 password is a secret: never printed.
        f.debug_struct("HelperConfig")
            .field("agent_address", &self.agent_address)
            .field("cert_dir", &self.cert_dir)
            .field("x509", &self.x509)
            .field("jwt_svids", &self.jwt_svids)
            .finish_non_exhaustive()
    }
}

impl HelperConfig {
    /// Reads and validates `path`, in `format` or the one its name suggests.
    pub fn load(path: &Path, format: Option<ConfigFormat>) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let format = format.unwrap_or_else(|| ConfigFormat::from_path(path));
        Self::parse(&text, format, path)
    }

    /// Parses configuration text; `path` names it in errors.
    pub fn parse(text: &str, format: ConfigFormat, path: &Path) -> Result<Self, ConfigError> {
        let raw: RawConfig = match format {
            ConfigFormat::Toml => toml::from_str(text).map_err(|e| ConfigError::Toml {
                path: path.to_path_buf(),
                message: e.to_string(),
            })?,
            ConfigFormat::Hcl => hcl::from_str(text).map_err(|e| ConfigError::Hcl {
                path: path.to_path_buf(),
                message: e.to_string(),
            })?,
        };
        raw.validate(format)
    }
}

impl RawConfig {
    fn validate(self, format: ConfigFormat) -> Result<HelperConfig, ConfigError> {
        let inv = |s: &str| ConfigError::Invalid(s.to_string());
        let addr = match self.agent_address.filter(|a| !a.is_empty()) {
            Some(a) => a,
            None => std::env::var("SPIFFE_ENDPOINT_SOCKET")
                .ok()
                .filter(|a| !a.is_empty())
                .unwrap_or_else(|| DEFAULT_AGENT_SOCKET.to_string()),
        };
        let cert_dir = self
            .cert_dir
            .filter(|d| !d.as_os_str().is_empty())
            .ok_or_else(|| inv("cert_dir is required"))?;
        let x509 = X509Files {
            svid: file_name(self.svid_file_name, "svid_file_name")?,
            key: file_name(self.svid_key_file_name, "svid_key_file_name")?,
            bundle: file_name(self.svid_bundle_file_name, "svid_bundle_file_name")?,
            combined: file_name(self.svid_combined_file_name, "svid_combined_file_name")?,
            pkcs12: file_name(self.pkcs12_file_name, "pkcs12_file_name")?,
            add_intermediates_to_bundle: self.add_intermediates_to_bundle,
            include_federated_domains: self.include_federated_domains,
        };
        if x509.svid.is_some() != x509.key.is_some() {
            return Err(inv(
                "svid_file_name and svid_key_file_name go together (a certificate is useless without its key)",
            ));
        }
        let pkcs12_password = match (&x509.pkcs12, self.pkcs12_password) {
            (Some(_), Some(p)) => p,
            (Some(_), None) => {
                return Err(inv("pkcs12_file_name needs pkcs12_password"));
            }
            (None, Some(_)) => return Err(inv("pkcs12_password without pkcs12_file_name")),
            (None, None) => String::new(),
        };
        let mut jwt_svids = Vec::new();
        for (i, j) in self.jwt_svids.into_iter().enumerate() {
            if j.jwt_audience.is_empty() {
                return Err(ConfigError::Invalid(format!(
                    "jwt_svids[{i}]: jwt_audience is required"
                )));
            }
            let file_name = file_name(Some(j.jwt_svid_file_name), "jwt_svid_file_name")?
                .ok_or_else(|| {
                    ConfigError::Invalid(format!("jwt_svids[{i}]: jwt_svid_file_name is required"))
                })?;
            let mut audiences = vec![j.jwt_audience];
            audiences.extend(j.jwt_extra_audiences);
            jwt_svids.push(JwtSvidFile {
                audiences,
                file_name,
            });
        }
        let jwt_bundle = file_name(self.jwt_bundle_file_name, "jwt_bundle_file_name")?;
        if !x509.any() && jwt_svids.is_empty() && jwt_bundle.is_none() {
            return Err(inv(
                "nothing to write: set svid_file_name + svid_key_file_name, svid_bundle_file_name, svid_combined_file_name, pkcs12_file_name, jwt_svids or jwt_bundle_file_name",
            ));
        }
        let mut names: Vec<&String> = [
            &x509.svid,
            &x509.key,
            &x509.bundle,
            &x509.combined,
            &x509.pkcs12,
            &jwt_bundle,
        ]
        .into_iter()
        .flatten()
        .collect();
        names.extend(jwt_svids.iter().map(|j| &j.file_name));
        let mut sorted = names.clone();
        sorted.sort();
        if let Some(w) = sorted.windows(2).find(|w| w[0] == w[1]) {
            return Err(ConfigError::Invalid(format!(
                "file name {:?} is used twice",
                w[0]
            )));
        }
        let cmd = match self.cmd.filter(|c| !c.is_empty()) {
            None => {
                if self.cmd_args.is_some() {
                    return Err(inv("cmd_args without cmd"));
                }
                None
            }
            Some(c) => {
                let args = match self.cmd_args {
                    None => Vec::new(),
                    Some(CmdArgs::Line(l)) => split_args(&l)?,
                    Some(CmdArgs::List(v)) => v,
                };
                Some((c, args))
            }
        };
        let renew_signal = match self.renew_signal.as_deref().filter(|s| !s.is_empty()) {
            Some(s) => parse_signal(s)?,
            None => Signal::SIGHUP,
        };
        let key_mode = mode(self.key_file_mode.as_ref(), "key_file_mode", 0o600, format)?;
        if key_mode & 0o007 != 0 {
            // A private key every local user can read is no identity at all.
            return Err(ConfigError::Invalid(format!(
                "key_file_mode: {key_mode:#o} lets every local user read the private key; \
                 use 0600 (the default), or 0640 with file_group for an app in that group"
            )));
        }
        if key_mode & 0o070 != 0 {
            tracing::warn!(
                mode = format!("{key_mode:#o}"),
                "key_file_mode lets the file's group read the private key"
            );
        }
        Ok(HelperConfig {
            agent_address: endpoint(&addr)?,
            cmd,
            pid_file: self.pid_file_name.filter(|p| !p.as_os_str().is_empty()),
            cert_dir,
            renew_signal,
            daemon_mode: self.daemon_mode.unwrap_or(true),
            hint: self.hint.filter(|h| !h.is_empty()),
            cert_mode: mode(
                self.cert_file_mode.as_ref(),
                "cert_file_mode",
                0o644,
                format,
            )?,
            key_mode,
            jwt_bundle_mode: mode(
                self.jwt_bundle_file_mode.as_ref(),
                "jwt_bundle_file_mode",
                0o600,
                format,
            )?,
            jwt_svid_mode: mode(
                self.jwt_svid_file_mode.as_ref(),
                "jwt_svid_file_mode",
                0o600,
                format,
            )?,
            pkcs12_password,
            owner: self.file_owner.as_deref().map(user).transpose()?,
            group: self.file_group.as_deref().map(group).transpose()?,
            x509,
            jwt_svids,
            jwt_bundle,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn hcl(s: &str) -> Result<HelperConfig, ConfigError> {
        HelperConfig::parse(s, ConfigFormat::Hcl, Path::new("helper.conf"))
    }

    fn toml(s: &str) -> Result<HelperConfig, ConfigError> {
        HelperConfig::parse(s, ConfigFormat::Toml, Path::new("helper.toml"))
    }

    /// spiffe-helper's documented example, as a user has it.
    const SPIFFE_HELPER_EXAMPLE: &str = r#"
agent_address = "/tmp/spire-agent/public/api.sock"
cmd = "ghostunnel"
cmd_args = "server --listen localhost:8002 --target localhost:8001 --keystore certs/svid_key.pem --cacert certs/svid_bundle.pem --allow-uri-san spiffe://example.org/Database"
cert_dir = "certs"
renew_signal = "SIGUSR1"
svid_file_name = "svid.pem"
svid_key_file_name = "svid_key.pem"
svid_bundle_file_name = "svid_bundle.pem"
jwt_svids = [{jwt_audience="your-audience",jwt_extra_audiences=["your-extra-audience-1", "your-extra-audience-2"], jwt_svid_file_name="jwt_svid.token"}]
jwt_bundle_file_name = "bundle.json"
cert_file_mode = 0444
key_file_mode = 0440
jwt_bundle_file_mode = 0444
jwt_svid_file_mode = 0444
"#;

    #[test]
    fn spiffe_helper_example_is_accepted() {
        let c = hcl(SPIFFE_HELPER_EXAMPLE).unwrap();
        assert_eq!(c.agent_address, "unix:///tmp/spire-agent/public/api.sock");
        let (cmd, args) = c.cmd.clone().unwrap();
        assert_eq!(cmd, "ghostunnel");
        assert_eq!(args.len(), 11);
        assert_eq!(args[0], "server");
        assert_eq!(c.renew_signal, Signal::SIGUSR1);
        assert_eq!(c.cert_mode, 0o444);
        assert_eq!(c.key_mode, 0o440);
        assert_eq!(c.jwt_bundle_mode, 0o444);
        assert_eq!(c.x509.svid.as_deref(), Some("svid.pem"));
        assert_eq!(
            c.jwt_svids[0].audiences,
            [
                "your-audience",
                "your-extra-audience-1",
                "your-extra-audience-2"
            ]
        );
        assert!(c.daemon_mode);
    }

    #[test]
    fn unknown_keys_are_named() {
        let e = hcl("cert_dir = \"c\"\nsvid_bundle_file_name = \"b\"\nsvid_fle_name = \"x\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("svid_fle_name"), "{e}");
        let e = toml("cert_dir = \"c\"\nsvid_bundle_file_name = \"b\"\nbogus = 1\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("bogus"), "{e}");
        let e = hcl("cert_dir = \"c\"\njwt_svids = [{jwt_audience=\"a\", jwt_svid_file_name=\"t\", extra=1}]\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("extra"), "{e}");
    }

    #[test]
    fn modes_in_both_formats() {
        let c = toml("cert_dir = \"c\"\nsvid_bundle_file_name = \"b\"\ncert_file_mode = 0o640\nkey_file_mode = \"0600\"\n").unwrap();
        assert_eq!(c.cert_mode, 0o640);
        assert_eq!(c.key_mode, 0o600);
        // A decimal 644 in TOML is not a mode: a clear error, not 0o1204.
        let e = toml("cert_dir = \"c\"\nsvid_bundle_file_name = \"b\"\ncert_file_mode = 644\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("cert_file_mode"), "{e}");
        let e = hcl("cert_dir = \"c\"\nsvid_bundle_file_name = \"b\"\ncert_file_mode = 0698\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("cert_file_mode"), "{e}");
        let c = hcl("cert_dir = \"c\"\nsvid_bundle_file_name = \"b\"\n").unwrap();
        assert_eq!((c.cert_mode, c.key_mode), (0o644, 0o600));
    }

    #[test]
    fn a_key_every_user_can_read_is_refused() {
        let base = "agent_address = \"/a.sock\"\ncert_dir = \"c\"\nsvid_file_name = \"s.pem\"\nsvid_key_file_name = \"k.pem\"\n";
        let e = hcl(&format!("{base}key_file_mode = 0444\n")).unwrap_err();
        assert!(e.to_string().contains("every local user"), "{e}");
        let ok = hcl(&format!("{base}key_file_mode = 0640\n")).unwrap();
        assert_eq!(ok.key_mode, 0o640);
    }

    #[test]
    fn inconsistent_settings_are_refused() {
        for (cfg, want) in [
            ("svid_bundle_file_name = \"b\"\n", "cert_dir"),
            ("cert_dir = \"c\"\n", "nothing to write"),
            ("cert_dir = \"c\"\nsvid_file_name = \"s\"\n", "go together"),
            (
                "cert_dir = \"c\"\nsvid_bundle_file_name = \"../b\"\n",
                "plain file name",
            ),
            (
                "cert_dir = \"c\"\nsvid_file_name = \"s\"\nsvid_key_file_name = \"s\"\n",
                "used twice",
            ),
            (
                "cert_dir = \"c\"\nsvid_bundle_file_name = \"b\"\npkcs12_file_name = \"p\"\n",
                "pkcs12_password",
            ),
            (
                "cert_dir = \"c\"\nsvid_bundle_file_name = \"b\"\nrenew_signal = \"SIGNOPE\"\n",
                "unknown signal",
            ),
            (
                "cert_dir = \"c\"\nsvid_bundle_file_name = \"b\"\ncmd_args = \"x\"\n",
                "cmd_args without cmd",
            ),
        ] {
            let e = hcl(cfg).unwrap_err().to_string();
            assert!(e.contains(want), "{cfg}: {e}");
        }
    }

    #[test]
    fn signals_and_args() {
        assert_eq!(parse_signal("hup").unwrap(), Signal::SIGHUP);
        assert_eq!(parse_signal("SIGUSR2").unwrap(), Signal::SIGUSR2);
        assert_eq!(
            split_args(r#"-c 'a b' "c \"d\"" e\ f"#).unwrap(),
            ["-c", "a b", "c \"d\"", "e f"]
        );
        assert!(split_args("'open").is_err());
        assert_eq!(split_args("  ").unwrap(), Vec::<String>::new());
    }

    #[test]
    fn agent_address_forms() {
        assert_eq!(endpoint("unix:///a/b.sock").unwrap(), "unix:///a/b.sock");
        assert_eq!(endpoint("/a/b.sock").unwrap(), "unix:///a/b.sock");
        assert!(endpoint("tcp://1.2.3.4:1").is_err());
    }
}
