//! Publishing the X.509 files so that a reader sees either every old file or
//! every new one, never a key with another certificate, even across a crash.
//!
//! Each update is written into a fresh version directory
//! `<cert_dir>/..meshid_<version>/`; every file in it is written with
//! [`meshid_identity::files::write_atomic`] (a unique `O_EXCL` temporary
//! file, exact mode, fsync, rename, fsync of the directory). Only then is the
//! one symlink `<cert_dir>/..meshid_data` swapped to the new version with a
//! single `rename(2)` and the directory fsynced. The names the application
//! reads, `<cert_dir>/<file>`, are fixed symlinks to `..meshid_data/<file>`.
//!
//! So the switch from one complete set to the next is one atomic rename: a
//! crash before it leaves the previous set in place and matching, a crash
//! after it leaves the new one. Renaming the files one by one instead would
//! leave a window (and, after a crash, a lasting state) with a new
//! certificate and an old key. A reader that opens two files at two moments
//! can still straddle a swap; readers that must not (or that reload on their
//! own schedule) use the combined chain+key file, one `open(2)`. The version
//! before the current one is kept until the next update, so a reader that
//! has just resolved `..meshid_data` still finds its files.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use meshid_identity::files::{sync_dir, write_atomic};

use crate::render::OutFile;

/// The symlink naming the current version directory.
pub const DATA_LINK: &str = "..meshid_data";
const VERSION_PREFIX: &str = "..meshid_v";
const TEMP_LINK_PREFIX: &str = "..meshid_tmp";

/// Environment variable that makes the process abort at a chosen point of a
/// chosen update (`partial-write@N` or `before-swap@N`), to prove that a
/// crash there leaves the previous files intact. Read by debug builds only.
pub const FAULT_ENV: &str = "MESHID_HELPER_FAULT";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FaultPoint {
    PartialWrite,
    BeforeSwap,
}

/// Writes file sets into a directory, one atomic switch per set.
#[derive(Debug)]
pub struct Publisher {
    dir: PathBuf,
    owner: Option<u32>,
    group: Option<u32>,
    published: u64,
    fault: Option<(FaultPoint, u64)>,
}

fn unique(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    format!(
        "{prefix}{}.{:09}_{}_{}",
        now.as_secs(),
        now.subsec_nanos(),
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

fn parse_fault(v: &str) -> Option<(FaultPoint, u64)> {
    let (point, n) = v.split_once('@')?;
    let point = match point {
        "partial-write" => FaultPoint::PartialWrite,
        "before-swap" => FaultPoint::BeforeSwap,
        _ => return None,
    };
    Some((point, n.parse().ok()?))
}

/// Replaces `link` with a symlink to `target`, atomically.
fn replace_symlink(dir: &Path, link: &Path, target: &Path) -> std::io::Result<()> {
    let mut last = std::io::Error::other("no temporary name tried");
    for _ in 0..16 {
        let tmp = dir.join(unique(TEMP_LINK_PREFIX));
        match std::os::unix::fs::symlink(target, &tmp) {
            Ok(()) => {
                return std::fs::rename(&tmp, link).inspect_err(|_| {
                    let _ = std::fs::remove_file(&tmp);
                });
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last = e,
            Err(e) => return Err(e),
        }
    }
    Err(last)
}

impl Publisher {
    /// A publisher for `dir` (which must exist), giving written files the
    /// owner and group when set. Reads [`FAULT_ENV`].
    pub fn new(dir: PathBuf, owner: Option<u32>, group: Option<u32>) -> Self {
        // Only debug builds (the test suite's) read the fault hook; a
        // release binary never aborts on an environment variable.
        let fault = if cfg!(debug_assertions) {
            std::env::var(FAULT_ENV).ok().and_then(|v| parse_fault(&v))
        } else {
            None
        };
        Self {
            dir,
            owner,
            group,
            published: 0,
            fault,
        }
    }

    fn crash_at(&self, point: FaultPoint) -> bool {
        self.fault == Some((point, self.published + 1))
    }

    fn chown(&self, p: &Path) -> std::io::Result<()> {
        if self.owner.is_some() || self.group.is_some() {
            std::os::unix::fs::chown(p, self.owner, self.group)?;
        }
        Ok(())
    }

    /// The version directory `..meshid_data` points to now, if any.
    fn current(&self) -> Option<String> {
        std::fs::read_link(self.dir.join(DATA_LINK))
            .ok()
            .and_then(|t| t.to_str().map(str::to_string))
    }

    /// Writes `files` as the new current set; on error the previous set
    /// stays current.
    pub fn publish(&mut self, files: &[OutFile]) -> std::io::Result<()> {
        use std::os::unix::fs::DirBuilderExt;
        let previous = self.current();
        let version = loop {
            let name = unique(VERSION_PREFIX);
            match std::fs::DirBuilder::new()
                .mode(0o755)
                .create(self.dir.join(&name))
            {
                Ok(()) => break name,
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        };
        let vdir = self.dir.join(&version);
        let res = (|| {
            // The creation mode is masked by the umask: set the exact one.
            std::fs::set_permissions(&vdir, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
            self.chown(&vdir)?;
            for (i, f) in files.iter().enumerate() {
                let path = vdir.join(&f.name);
                if i + 1 == files.len() && self.crash_at(FaultPoint::PartialWrite) {
                    std::fs::write(&path, &f.data[..f.data.len() / 2])?;
                    tracing::error!(fault = FAULT_ENV, "aborting in the middle of a write");
                    std::process::abort();
                }
                write_atomic(&path, &f.data, f.mode)?;
                self.chown(&path)?;
            }
            sync_dir(&vdir)
        })();
        if let Err(e) = res {
            let _ = std::fs::remove_dir_all(&vdir);
            return Err(e);
        }
        if self.crash_at(FaultPoint::BeforeSwap) {
            tracing::error!(fault = FAULT_ENV, "aborting before the switch");
            std::process::abort();
        }
        // The switch: one rename.
        if let Err(e) = replace_symlink(&self.dir, &self.dir.join(DATA_LINK), Path::new(&version)) {
            let _ = std::fs::remove_dir_all(&vdir);
            return Err(e);
        }
        sync_dir(&self.dir)?;
        self.published += 1;
        // The names the application reads: fixed links into the current set.
        let mut changed = false;
        for f in files {
            let link = self.dir.join(&f.name);
            let target = Path::new(DATA_LINK).join(&f.name);
            if std::fs::read_link(&link).ok().as_deref() != Some(target.as_path()) {
                replace_symlink(&self.dir, &link, &target)?;
                changed = true;
            }
        }
        if changed {
            sync_dir(&self.dir)?;
        }
        self.clean(&version, previous.as_deref());
        Ok(())
    }

    /// Removes version directories other than the current and the previous
    /// one, and temporary links left by a crash.
    fn clean(&self, current: &str, previous: Option<&str>) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name();
            let Some(name) = name.to_str() else { continue };
            let path = e.path();
            if name.starts_with(VERSION_PREFIX) && name != current && Some(name) != previous {
                if let Ok(m) = std::fs::symlink_metadata(&path)
                    && m.is_dir()
                    && let Err(err) = std::fs::remove_dir_all(&path)
                {
                    tracing::warn!(path = %path.display(), error = %err, "cannot remove an old version");
                }
            } else if name.starts_with(TEMP_LINK_PREFIX) {
                let _ = std::fs::remove_file(&path);
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn file(name: &str, data: &str, mode: u32) -> OutFile {
        OutFile {
            name: name.into(),
            data: data.as_bytes().to_vec(),
            mode,
            randomized: false,
        }
    }

    #[test]
    fn sets_switch_whole_and_old_versions_go() {
        use std::os::unix::fs::MetadataExt;
        let d = tempfile::tempdir().unwrap();
        // A regular file from an earlier tool is replaced by the link.
        std::fs::write(d.path().join("cert.pem"), "from before").unwrap();
        let mut p = Publisher::new(d.path().to_path_buf(), None, None);
        for i in 0..4 {
            p.publish(&[
                file("cert.pem", &format!("cert {i}"), 0o644),
                file("key.pem", &format!("key {i}"), 0o600),
            ])
            .unwrap();
            let cert = std::fs::read_to_string(d.path().join("cert.pem")).unwrap();
            let key = std::fs::read_to_string(d.path().join("key.pem")).unwrap();
            assert_eq!((cert, key), (format!("cert {i}"), format!("key {i}")));
            let m = std::fs::metadata(d.path().join("key.pem")).unwrap();
            assert_eq!(m.mode() & 0o7777, 0o600);
        }
        let versions = std::fs::read_dir(d.path())
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_str()
                    .unwrap()
                    .starts_with(VERSION_PREFIX)
            })
            .count();
        assert_eq!(versions, 2, "current and previous only");
    }

    #[test]
    fn fault_spec() {
        assert_eq!(
            parse_fault("before-swap@2"),
            Some((FaultPoint::BeforeSwap, 2))
        );
        assert_eq!(parse_fault("nope@2"), None);
        assert_eq!(parse_fault("partial-write"), None);
    }
}
