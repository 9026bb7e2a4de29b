//! Writing CA keys and certificates: exact mode, atomically and durably.
//!
//! Both go through [`meshid_identity::files::write_atomic`]: a fresh
//! `O_EXCL` temporary file (a planted file or symlink at a temporary name is
//! never used), `fchmod` to the mode, fsync of the file, one rename and an
//! fsync of the directory. The directory is created 0700.

use std::path::Path;

use meshid_identity::files;

/// Writes `data` to `path` with mode 0600, replacing it atomically.
pub fn write_secret(path: &Path, data: &[u8]) -> std::io::Result<()> {
    write_file(path, data, 0o600)
}

/// Writes `data` to `path` with `mode`, replacing it atomically.
pub fn write_file(path: &Path, data: &[u8], mode: u32) -> std::io::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        files::create_private_dir(dir)?;
    }
    files::write_atomic(path, data, mode)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    /// The name the previous helper used for its temporary file, planted
    /// world-readable and as a symlink: the key still ends 0600 and nothing
    /// is written through the link.
    #[test]
    fn planted_legacy_temp_names_are_ignored() {
        let dir = tempfile::tempdir().expect("tmp");
        let ca = dir.path().join("ca");
        std::fs::create_dir(&ca).expect("mkdir");
        std::fs::set_permissions(&ca, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let planted = ca.join(".signing-ca.key.tmp");
        std::fs::write(&planted, "").expect("w");
        std::fs::set_permissions(&planted, std::fs::Permissions::from_mode(0o666)).expect("c");
        let outside = dir.path().join("outside");
        std::fs::write(&outside, "untouched").expect("w");
        std::os::unix::fs::symlink(&outside, ca.join(".jwt.key.tmp")).expect("symlink");

        write_secret(&ca.join("signing-ca.key"), b"k1").expect("write");
        write_secret(&ca.join("jwt.key"), b"k2").expect("write");
        for k in ["signing-ca.key", "jwt.key"] {
            assert_eq!(
                std::fs::metadata(ca.join(k)).expect("m").mode() & 0o7777,
                0o600
            );
        }
        assert_eq!(std::fs::read(&outside).expect("r"), b"untouched");
        assert_eq!(std::fs::read(&planted).expect("r"), b"");
        assert_eq!(std::fs::metadata(&ca).expect("m").mode() & 0o7777, 0o700);
    }
}
