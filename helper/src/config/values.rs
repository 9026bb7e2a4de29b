//! Single configuration values as both formats write them: file modes
//! (octal in HCL), file names inside `cert_dir`, signal names, command
//! lines, the agent's socket address, and file owners.

use std::path::Path;
use std::str::FromStr;

use nix::sys::signal::Signal;

use super::{ConfigError, ConfigFormat, ModeValue};

pub(super) fn mode(
    v: Option<&ModeValue>,
    key: &str,
    default: u32,
    format: ConfigFormat,
) -> Result<u32, ConfigError> {
    let bad = |why: &str| ConfigError::Invalid(format!("{key}: {why}"));
    let m = match v {
        None => return Ok(default),
        Some(ModeValue::Str(s)) => {
            let digits = s.trim_start_matches("0o");
            u32::from_str_radix(digits, 8)
                .map_err(|_| bad(&format!("{s:?} is not an octal mode such as \"0644\"")))?
        }
        Some(ModeValue::Int(i)) if format == ConfigFormat::Hcl => {
            // HCL as spiffe-helper reads it: 0644 is octal.
            let digits = i.to_string();
            u32::from_str_radix(&digits, 8)
                .map_err(|_| bad(&format!("{i} is not an octal mode such as 0644")))?
        }
        Some(ModeValue::Int(i)) => u32::try_from(*i).map_err(|_| bad("a mode is not negative"))?,
    };
    if m > 0o777 {
        return Err(bad(&format!(
            "{m:#o} is not a permission mode (in TOML write 0o644 or \"0644\")"
        )));
    }
    if m & 0o400 == 0 {
        return Err(bad("the owner must be able to read the file"));
    }
    Ok(m)
}

pub(super) fn file_name(v: Option<String>, key: &str) -> Result<Option<String>, ConfigError> {
    let Some(n) = v else { return Ok(None) };
    if n.is_empty() {
        return Ok(None);
    }
    if n.contains('/') || n.starts_with("..") || n == "." || n.contains('\0') {
        return Err(ConfigError::Invalid(format!(
            "{key}: {n:?} must be a plain file name inside cert_dir"
        )));
    }
    Ok(Some(n))
}

/// Parses a signal name: `SIGHUP`, `HUP` or `sighup`.
pub fn parse_signal(s: &str) -> Result<Signal, ConfigError> {
    let upper = s.trim().to_ascii_uppercase();
    let name = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    Signal::from_str(&name)
        .map_err(|_| ConfigError::Invalid(format!("renew_signal: unknown signal {s:?}")))
}

/// Splits a command line the way a shell would for plain words and quotes
/// (no expansion): `a "b c" 'd'` is `["a", "b c", "d"]`.
pub fn split_args(line: &str) -> Result<Vec<String>, ConfigError> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\'' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(x) => cur.push(x),
                        None => {
                            return Err(ConfigError::Invalid(
                                "cmd_args: unterminated single quote".into(),
                            ));
                        }
                    }
                }
            }
            '"' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(x) => cur.push(x),
                            None => break,
                        },
                        Some(x) => cur.push(x),
                        None => {
                            return Err(ConfigError::Invalid(
                                "cmd_args: unterminated double quote".into(),
                            ));
                        }
                    }
                }
            }
            '\\' => {
                in_word = true;
                if let Some(x) = chars.next() {
                    cur.push(x);
                }
            }
            c if c.is_whitespace() => {
                if in_word {
                    out.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            c => {
                in_word = true;
                cur.push(c);
            }
        }
    }
    if in_word {
        out.push(cur);
    }
    Ok(out)
}

/// `unix:///abs`, from a path, `unix:path` or `unix:///path`.
pub(super) fn endpoint(addr: &str) -> Result<String, ConfigError> {
    let path = addr
        .strip_prefix("unix://")
        .or_else(|| addr.strip_prefix("unix:"))
        .unwrap_or(addr);
    if path.is_empty() || addr.starts_with("tcp:") {
        return Err(ConfigError::Invalid(format!(
            "agent_address: {addr:?} is not a Unix socket path"
        )));
    }
    let p = Path::new(path);
    let abs = if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir()
            .map_err(|e| ConfigError::Invalid(format!("agent_address: {e}")))?
            .join(p)
    };
    Ok(format!("unix://{}", abs.display()))
}

pub(super) fn user(s: &str) -> Result<nix::unistd::Uid, ConfigError> {
    if let Ok(n) = s.parse::<u32>() {
        return Ok(nix::unistd::Uid::from_raw(n));
    }
    match nix::unistd::User::from_name(s) {
        Ok(Some(u)) => Ok(u.uid),
        _ => Err(ConfigError::Invalid(format!("file_owner: no user {s:?}"))),
    }
}

pub(super) fn group(s: &str) -> Result<nix::unistd::Gid, ConfigError> {
    if let Ok(n) = s.parse::<u32>() {
        return Ok(nix::unistd::Gid::from_raw(n));
    }
    match nix::unistd::Group::from_name(s) {
        Ok(Some(g)) => Ok(g.gid),
        _ => Err(ConfigError::Invalid(format!("file_group: no group {s:?}"))),
    }
}
