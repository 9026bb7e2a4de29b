//! Workload attestation from the kernel's view of the caller.
//!
//! The Workload API socket hands us the caller's uid, gid and pid
//! (SO_PEERCRED). From `/proc/<pid>` we derive the executable and its digest.
//! The process start time is read before and after, so a pid recycled by
//! another process in between is detected and refused.

use std::path::PathBuf;

use aws_lc_rs::digest::{Context, SHA256};
use meshid_proto::types::Selector;

/// The caller as the kernel reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caller {
    /// Process id, if the kernel reported one.
    pub pid: Option<i32>,
    /// Effective uid.
    pub uid: u32,
    /// Effective gid.
    pub gid: u32,
}

/// Why a caller could not be attested.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum AttestError {
    /// The kernel gave no pid.
    #[error("caller pid unknown")]
    NoPid,
    /// The process is gone or its /proc entry unreadable.
    #[error("cannot inspect caller process {pid}: {reason}")]
    Proc {
        /// Pid.
        pid: i32,
        /// Why.
        reason: String,
    },
    /// The pid now belongs to another process.
    #[error("caller process {0} changed during attestation (pid reuse)")]
    PidReused(i32),
    /// The caller's cgroup names a pod outside the kubelet's layout.
    #[error("k8s attestor: process {pid}: {reason}")]
    Cgroup {
        /// Pid.
        pid: i32,
        /// Why.
        reason: String,
    },
    /// The kubelet could not be asked.
    #[error("k8s attestor: kubelet: {0}")]
    Kubelet(String),
    /// The caller's pod or container is unknown to the kubelet.
    #[error("k8s attestor: pod {pod_uid} container {container_id} is not running on this node")]
    UnknownPod {
        /// From the caller's cgroup.
        pod_uid: String,
        /// From the caller's cgroup.
        container_id: String,
    },
}

impl AttestError {
    /// Metric label.
    pub fn label(&self) -> &'static str {
        match self {
            Self::NoPid => "no_pid",
            Self::Proc { .. } => "proc_error",
            Self::PidReused(_) => "pid_reused",
            Self::Cgroup { .. } => "cgroup_layout",
            Self::Kubelet(_) => "kubelet_error",
            Self::UnknownPod { .. } => "unknown_pod",
        }
    }
}

/// Something that turns a caller into selectors.
pub trait WorkloadAttestor: Send + Sync {
    /// Selector type this attestor produces (`unix`, `k8s`, …).
    fn name(&self) -> &'static str;
    /// Selectors for the caller.
    fn attest(&self, caller: &Caller) -> Result<Vec<Selector>, AttestError>;
}

/// Identity of an executable file: a changed file gets a new key.
type FileKey = (u64, u64, u64, i64, i64);

/// The `unix` attestor, reading `/proc` (or another root for tests).
///
/// Executable digests are cached by (device, inode, size, mtime) of the file
/// the process runs, so a large binary is hashed once, not on every call.
#[derive(Debug)]
pub struct UnixAttestor {
    proc_root: PathBuf,
    digests: std::sync::Mutex<std::collections::HashMap<FileKey, String>>,
}

impl Default for UnixAttestor {
    fn default() -> Self {
        Self::with_proc_root(PathBuf::from("/proc"))
    }
}

fn sel(value: String) -> Selector {
    Selector {
        r#type: "unix".into(),
        value,
    }
}

impl UnixAttestor {
    /// An attestor reading `proc_root` instead of `/proc`.
    pub fn with_proc_root(proc_root: PathBuf) -> Self {
        Self {
            proc_root,
            digests: std::sync::Mutex::new(std::collections::HashMap::new()),
        }
    }

    fn exe_digest(&self, pid: i32) -> Result<String, AttestError> {
        use std::io::Read;
        use std::os::unix::fs::MetadataExt;
        let path = self.proc_root.join(pid.to_string()).join("exe");
        let mut f = std::fs::File::open(&path).map_err(|e| AttestError::Proc {
            pid,
            reason: format!("exe: {e}"),
        })?;
        let m = f.metadata().map_err(|e| AttestError::Proc {
            pid,
            reason: format!("exe: {e}"),
        })?;
        let key = (m.dev(), m.ino(), m.size(), m.mtime(), m.mtime_nsec());
        if let Some(d) = self.digests.lock().ok().and_then(|c| c.get(&key).cloned()) {
            return Ok(d);
        }
        let mut ctx = Context::new(&SHA256);
        let mut buf = vec![0u8; 1 << 16];
        loop {
            match f.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => ctx.update(&buf[..n]),
                Err(e) => {
                    return Err(AttestError::Proc {
                        pid,
                        reason: format!("exe read: {e}"),
                    });
                }
            }
        }
        let d = hex::encode(ctx.finish());
        if let Ok(mut c) = self.digests.lock() {
            if c.len() > 4096 {
                c.clear();
            }
            c.insert(key, d.clone());
        }
        Ok(d)
    }

    fn start_time(&self, pid: i32) -> Result<String, AttestError> {
        let stat = std::fs::read_to_string(self.proc_root.join(pid.to_string()).join("stat"))
            .map_err(|e| AttestError::Proc {
                pid,
                reason: e.to_string(),
            })?;
        // Field 22 (starttime), counted after the ")" that ends the command name.
        let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
        rest.split_whitespace()
            .nth(19)
            .map(str::to_string)
            .ok_or_else(|| AttestError::Proc {
                pid,
                reason: "malformed stat".into(),
            })
    }

    fn supplementary_gids(&self, pid: i32) -> Result<Vec<u32>, AttestError> {
        let status = std::fs::read_to_string(self.proc_root.join(pid.to_string()).join("status"))
            .map_err(|e| AttestError::Proc {
            pid,
            reason: e.to_string(),
        })?;
        Ok(status
            .lines()
            .find_map(|l| l.strip_prefix("Groups:"))
            .map(|g| {
                g.split_whitespace()
                    .filter_map(|x| x.parse().ok())
                    .collect()
            })
            .unwrap_or_default())
    }
}

impl WorkloadAttestor for UnixAttestor {
    fn name(&self) -> &'static str {
        "unix"
    }

    fn attest(&self, c: &Caller) -> Result<Vec<Selector>, AttestError> {
        let pid = c.pid.ok_or(AttestError::NoPid)?;
        let before = self.start_time(pid)?;
        let mut out = vec![sel(format!("uid:{}", c.uid)), sel(format!("gid:{}", c.gid))];
        if let Ok(Some(u)) = nix::unistd::User::from_uid(c.uid.into()) {
            out.push(sel(format!("user:{}", u.name)));
        }
        if let Ok(Some(g)) = nix::unistd::Group::from_gid(c.gid.into()) {
            out.push(sel(format!("group:{}", g.name)));
        }
        for g in self.supplementary_gids(pid)? {
            out.push(sel(format!("supplementary_gid:{g}")));
        }
        let exe =
            std::fs::read_link(self.proc_root.join(pid.to_string()).join("exe")).map_err(|e| {
                AttestError::Proc {
                    pid,
                    reason: format!("exe: {e}"),
                }
            })?;
        out.push(sel(format!("path:{}", exe.display())));
        // Hash through /proc/<pid>/exe: the very file the process runs, even if
        // the path was replaced since.
        out.push(sel(format!("sha256:{}", self.exe_digest(pid)?)));
        if self.start_time(pid)? != before {
            return Err(AttestError::PidReused(pid));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attests_this_process() {
        let me = Caller {
            pid: Some(i32::try_from(std::process::id()).expect("pid")),
            uid: nix::unistd::geteuid().as_raw(),
            gid: nix::unistd::getegid().as_raw(),
        };
        let s = UnixAttestor::default().attest(&me).expect("attest");
        let values: Vec<&str> = s.iter().map(|x| x.value.as_str()).collect();
        assert!(values.contains(&format!("uid:{}", me.uid).as_str()));
        assert!(values.iter().any(|v| v.starts_with("path:/")));
        assert!(
            values
                .iter()
                .any(|v| v.starts_with("sha256:") && v.len() == 7 + 64)
        );
    }

    #[test]
    fn gone_process_is_refused() {
        let c = Caller {
            pid: Some(i32::MAX - 1),
            uid: 0,
            gid: 0,
        };
        assert!(matches!(
            UnixAttestor::default().attest(&c),
            Err(AttestError::Proc { .. })
        ));
        assert_eq!(
            UnixAttestor::default().attest(&Caller {
                pid: None,
                uid: 0,
                gid: 0
            }),
            Err(AttestError::NoPid)
        );
    }

    #[test]
    fn pid_reuse_is_detected_with_a_fake_proc() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("42");
        std::fs::create_dir_all(&p).expect("mkdir");
        std::fs::write(
            p.join("stat"),
            "42 (x) S 1 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 111 0 0",
        )
        .expect("stat");
        std::fs::write(p.join("status"), "Groups:\t10 20\n").expect("status");
        // No exe link: the attestor refuses rather than guessing.
        let a = UnixAttestor::with_proc_root(dir.path().to_path_buf());
        let r = a.attest(&Caller {
            pid: Some(42),
            uid: 1,
            gid: 1,
        });
        assert!(matches!(r, Err(AttestError::Proc { .. })), "{r:?}");
        assert_eq!(a.supplementary_gids(42).expect("gids"), vec![10, 20]);
        assert_eq!(a.start_time(42).expect("start"), "111");
    }
}

/// Several attestors; the caller's selectors are all of theirs together.
#[derive(Debug)]
pub struct Attestors(pub Vec<std::sync::Arc<dyn WorkloadAttestor>>);

impl std::fmt::Debug for dyn WorkloadAttestor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl WorkloadAttestor for Attestors {
    fn name(&self) -> &'static str {
        "all"
    }

    fn attest(&self, caller: &Caller) -> Result<Vec<Selector>, AttestError> {
        let mut out = Vec::new();
        for a in &self.0 {
            out.extend(a.attest(caller)?);
        }
        Ok(out)
    }
}
