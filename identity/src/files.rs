//! Writing key and certificate files so that a reader never sees a partial,
//! loosely permitted or mismatched file, even after a crash.
//!
//! [`write_atomic`] writes into a fresh temporary file in the target's
//! directory, created with `O_CREAT|O_EXCL` (so a file or symlink planted at a
//! temporary name is never opened or written through), sets the exact mode
//! with `fchmod` (the creation mode is subject to the umask and is ignored for
//! an existing file), fsyncs the file, renames it over the target and fsyncs
//! the directory, so the rename itself survives a crash. Several files that
//! must match each other (a key and its certificate) belong in one file
//! written by one call.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// How many fresh temporary names are tried before giving up.
const TEMP_ATTEMPTS: usize = 16;

fn temp_name(path: &Path, attempt: usize) -> PathBuf {
    use std::hash::{BuildHasher, Hasher};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    h.write_u32(std::process::id());
    h.write_usize(attempt);
    if let Ok(d) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        h.write_u128(d.as_nanos());
    }
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.{:016x}.tmp", h.finish()))
}

/// Creates `dir` (and missing parents) for private data: a directory this
/// call creates gets mode 0700, and an existing `dir` is tightened to 0700.
pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let meta = std::fs::metadata(dir)?;
    if meta.permissions().mode() & 0o7777 != 0o700 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

/// Fsyncs a directory, making renames and unlinks in it durable.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Replaces `path` with `data` at exactly `mode`, atomically and durably.
///
/// The parent directory must exist. On error the temporary file is removed
/// and `path` is left as it was.
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> std::io::Result<()> {
    write_atomic_with(path, data, mode, |attempt| temp_name(path, attempt))
}

fn write_atomic_with(
    path: &Path,
    data: &[u8],
    mode: u32,
    names: impl FnMut(usize) -> PathBuf,
) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let (tmp, mut f) = create_temp(mode, names)?;
    let res = (|| {
        // The creation mode is masked by the umask: set the exact one.
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        f.write_all(data)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = res {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    sync_dir(dir)
}

fn create_temp(
    mode: u32,
    mut names: impl FnMut(usize) -> PathBuf,
) -> std::io::Result<(PathBuf, std::fs::File)> {
    let mut last = std::io::Error::other("no temporary name tried");
    for attempt in 0..TEMP_ATTEMPTS {
        let tmp = names(attempt);
        // create_new: O_CREAT|O_EXCL, which also refuses a symlink.
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode & 0o700)
            .open(&tmp)
        {
            Ok(f) => return Ok((tmp, f)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last = e,
            Err(e) => return Err(e),
        }
    }
    Err(last)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn writes_exact_mode_despite_a_permissive_existing_target() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("key.pem");
        std::fs::write(&p, "old").expect("w");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o666)).expect("chmod");
        write_atomic(&p, b"secret", 0o600).expect("write");
        assert_eq!(std::fs::read(&p).expect("r"), b"secret");
        assert_eq!(std::fs::metadata(&p).expect("m").mode() & 0o7777, 0o600);
        write_atomic(&p, b"public", 0o644).expect("write");
        assert_eq!(std::fs::metadata(&p).expect("m").mode() & 0o7777, 0o644);
        // Nothing left behind.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .expect("ls")
            .map(|e| e.expect("e").file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("key.pem")]);
    }

    /// A world-readable file and a symlink planted at temporary names are
    /// skipped: neither is opened, the symlink's target is not written, and
    /// the key ends 0600.
    #[test]
    fn planted_temp_files_and_symlinks_are_not_used() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("key.pem");
        let planted = dir.path().join("planted.tmp");
        std::fs::write(&planted, "attacker").expect("w");
        std::fs::set_permissions(&planted, std::fs::Permissions::from_mode(0o666)).expect("c");
        let outside = dir.path().join("outside");
        std::fs::write(&outside, "untouched").expect("w");
        let link = dir.path().join("link.tmp");
        std::os::unix::fs::symlink(&outside, &link).expect("symlink");
        let fresh = dir.path().join("fresh.tmp");
        let names = [planted.clone(), link.clone(), fresh.clone()];
        write_atomic_with(&p, b"secret", 0o600, |i| names[i].clone()).expect("write");
        assert_eq!(std::fs::read(&p).expect("r"), b"secret");
        assert_eq!(std::fs::metadata(&p).expect("m").mode() & 0o7777, 0o600);
        assert_eq!(std::fs::read(&planted).expect("r"), b"attacker");
        assert_eq!(std::fs::read(&outside).expect("r"), b"untouched");
        assert!(!fresh.exists(), "renamed away");
        // Every name planted: a clear error, the target unchanged.
        let all = dir.path().join("all.tmp");
        std::fs::write(&all, "x").expect("w");
        let e = write_atomic_with(&p, b"other", 0o600, |_| all.clone()).expect_err("taken");
        assert_eq!(e.kind(), std::io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(&p).expect("r"), b"secret");
    }

    #[test]
    fn a_temp_name_is_never_reused() {
        let p = Path::new("/x/key.pem");
        let a = temp_name(p, 0);
        let b = temp_name(p, 0);
        assert_ne!(a, b);
        assert!(a.starts_with("/x/"));
    }

    #[test]
    fn private_dir_is_created_and_tightened() {
        let dir = tempfile::tempdir().expect("tmp");
        let d = dir.path().join("a/b");
        create_private_dir(&d).expect("mkdir");
        assert_eq!(std::fs::metadata(&d).expect("m").mode() & 0o7777, 0o700);
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        create_private_dir(&d).expect("again");
        assert_eq!(std::fs::metadata(&d).expect("m").mode() & 0o7777, 0o700);
    }
}
