//! Workload attestation from the kernel's view of the caller.
//!
//! The Workload API socket hands us the caller's uid, gid and pid
//! (SO_PEERCRED, captured when it connected) and a pidfd of that process.
//! When the connection is accepted, the agent *pins* the process: its start
//! time and the identity of the executable it runs (device, inode, size,
//! mtime, ctime). Every call then checks, before and after reading
//! `/proc/<pid>`, that the pinned process still exists (pidfd: a recycled
//! pid is never mistaken for it) and still runs the pinned executable (an
//! `execve` since connecting is refused), and derives `path` and `sha256`
//! from that very file.

use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use aws_lc_rs::digest::{Context, SHA256};
use meshid_proto::types::Selector;
use rustix::fs::{AtFlags, StatxFlags};

use crate::attest_cache::NameCache;

/// The caller as the kernel reports it.
#[derive(Debug, Clone)]
pub struct Caller {
    /// Process id, if the kernel reported one.
    pub pid: Option<i32>,
    /// Effective uid.
    pub uid: u32,
    /// Effective gid.
    pub gid: u32,
    /// What was pinned about the process when it connected; `None` for a
    /// caller attested without a connection (tests, tools).
    pub pinned: Option<Arc<Pinned>>,
}

impl Caller {
    /// A caller with nothing pinned.
    pub fn new(pid: Option<i32>, uid: u32, gid: u32) -> Self {
        Self {
            pid,
            uid,
            gid,
            pinned: None,
        }
    }
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
    /// The process that connected has exited (the socket is held by another).
    #[error("the process {0} that opened this connection has exited")]
    Exited(i32),
    /// The process runs another executable than when it connected.
    #[error(
        "caller process {0} runs another executable than when it connected (exec after connect)"
    )]
    ImageChanged(i32),
    /// Bytes on the connection came from a process that did not open it.
    #[error(
        "this connection was opened by process {connected} but is used by process {writer}; \
         open the Workload API connection in the process that uses it"
    )]
    ForeignWriter {
        /// The process that connected.
        connected: i32,
        /// The process that wrote (0: unknown to this pid namespace).
        writer: i32,
    },
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
            Self::Exited(_) => "exited",
            Self::ImageChanged(_) => "image_changed",
            Self::ForeignWriter { .. } => "foreign_writer",
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

/// Identity of an executable file: device, inode, size, mtime and ctime.
/// Writing the file changes mtime and ctime; ctime cannot be set back by
/// anyone, so a file with the same identity has the same content.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ExeId {
    dev: (u32, u32),
    ino: u64,
    size: u64,
    mtime: (i64, u32),
    ctime: (i64, u32),
}

impl ExeId {
    fn from_statx(s: &rustix::fs::Statx) -> Self {
        Self {
            dev: (s.stx_dev_major, s.stx_dev_minor),
            ino: s.stx_ino,
            size: s.stx_size,
            mtime: (s.stx_mtime.tv_sec, s.stx_mtime.tv_nsec),
            ctime: (s.stx_ctime.tv_sec, s.stx_ctime.tv_nsec),
        }
    }

    /// The file `path` names (following links, so `/proc/<pid>/exe` is the
    /// executable itself). `AT_STATX_DONT_SYNC`: attributes the kernel has,
    /// without a round trip to a FUSE daemon or NFS server a caller may
    /// control.
    pub fn of_path(path: &Path) -> std::io::Result<Self> {
        let s = rustix::fs::statx(
            rustix::fs::CWD,
            path,
            AtFlags::STATX_DONT_SYNC,
            StatxFlags::BASIC_STATS,
        )?;
        Ok(Self::from_statx(&s))
    }

    /// The open file `fd`.
    pub fn of_fd<F: AsFd>(fd: F) -> std::io::Result<Self> {
        let s = rustix::fs::statx(
            fd,
            "",
            AtFlags::EMPTY_PATH | AtFlags::STATX_DONT_SYNC,
            StatxFlags::BASIC_STATS,
        )?;
        Ok(Self::from_statx(&s))
    }

    fn same_file(&self, other: &Self) -> bool {
        self.dev == other.dev && self.ino == other.ino
    }
}

fn proc_err(pid: i32, what: &str) -> impl FnOnce(std::io::Error) -> AttestError + '_ {
    move |e| AttestError::Proc {
        pid,
        reason: format!("{what}: {e}"),
    }
}

/// Field 22 of `/proc/<pid>/stat` (start time, clock ticks after boot).
///
/// Read into a buffer on the stack until the field has arrived (the kernel
/// gives the whole line in one read): this runs for every new Workload API
/// connection, and `read_to_string` would also stat the file and read a
/// second time to see its end.
fn start_time(proc_root: &Path, pid: i32) -> Result<u64, AttestError> {
    use std::io::Read;
    let mut f = std::fs::File::open(proc_root.join(pid.to_string()).join("stat"))
        .map_err(proc_err(pid, "stat"))?;
    // 52 fields of at most 20 digits and a command name of at most 64
    // bytes (escaped) fit.
    let mut buf = [0u8; 1536];
    let mut len = 0;
    loop {
        let n = f.read(&mut buf[len..]).map_err(proc_err(pid, "stat"))?;
        len += n;
        if let Some(t) = start_time_field(&buf[..len], n == 0) {
            return Ok(t);
        }
        if n == 0 || len == buf.len() {
            return Err(AttestError::Proc {
                pid,
                reason: "malformed stat".into(),
            });
        }
    }
}

/// Field 22 of a `/proc/<pid>/stat` line read so far (all of it: `whole`),
/// once the field is complete. Fields are counted after the last ")",
/// which ends the command name.
fn start_time_field(stat: &[u8], whole: bool) -> Option<u64> {
    let close = stat.iter().rposition(|&b| b == b')')?;
    let rest = std::str::from_utf8(&stat[close + 1..]).ok()?;
    let mut fields = rest.split_ascii_whitespace();
    let v = fields.nth(19)?;
    // Complete if something follows it (or nothing more will come).
    if !whole && fields.next().is_none() && !rest.ends_with(char::is_whitespace) {
        return None;
    }
    v.parse().ok()
}

/// What the agent pinned about a process when it connected.
pub struct Pinned {
    pid: i32,
    pidfd: Option<OwnedFd>,
    start_time: u64,
    exe: ExeId,
}

impl std::fmt::Debug for Pinned {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pinned")
            .field("pid", &self.pid)
            .field("pidfd", &self.pidfd.is_some())
            .field("start_time", &self.start_time)
            .field("exe", &self.exe)
            .finish()
    }
}

impl Pinned {
    /// Pins process `pid` (whose pidfd, if the kernel gives one, is
    /// `pidfd`) as it is now, reading `proc_root` (normally `/proc`).
    pub fn take(pid: i32, pidfd: Option<OwnedFd>, proc_root: &Path) -> Result<Self, AttestError> {
        let start_time = start_time(proc_root, pid)?;
        let exe = ExeId::of_path(&proc_root.join(pid.to_string()).join("exe"))
            .map_err(proc_err(pid, "exe"))?;
        let p = Self {
            pid,
            pidfd,
            start_time,
            exe,
        };
        // Still the process that connected, so what was read is about it.
        p.check_alive()?;
        Ok(p)
    }

    /// The pinned pid.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// The pinned process's start time (field 22 of `/proc/<pid>/stat`).
    pub fn start_time(&self) -> u64 {
        self.start_time
    }

    /// The identity of the executable the pinned process ran at connect.
    pub fn exe(&self) -> ExeId {
        self.exe
    }

    /// Whether the pinned process still exists (through its pidfd, so a
    /// recycled pid does not count).
    pub fn check_alive(&self) -> Result<(), AttestError> {
        let Some(fd) = &self.pidfd else {
            return Ok(());
        };
        use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
        let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::ZERO) {
            Ok(0) => Ok(()),
            Ok(_) => Err(AttestError::Exited(self.pid)),
            Err(e) => Err(AttestError::Proc {
                pid: self.pid,
                reason: format!("pidfd: {e}"),
            }),
        }
    }

    /// Whether the pinned process still exists and runs the pinned
    /// executable.
    ///
    /// With a pidfd, the process still being alive after `/proc/<pid>` was
    /// read proves the pid was not recycled in between, so the start time
    /// is compared only where the kernel gave no pidfd (it was a quarter of
    /// the agent's CPU per call under load).
    pub fn verify(&self, proc_root: &Path) -> Result<(), AttestError> {
        if self.pidfd.is_none() && start_time(proc_root, self.pid)? != self.start_time {
            return Err(AttestError::PidReused(self.pid));
        }
        let now = ExeId::of_path(&proc_root.join(self.pid.to_string()).join("exe"))
            .map_err(proc_err(self.pid, "exe"))?;
        self.check_alive()?;
        if now != self.exe {
            return Err(AttestError::ImageChanged(self.pid));
        }
        Ok(())
    }
}

/// The `unix` attestor, reading `/proc` (or another root for tests).
///
/// Executable digests are cached by [`ExeId`] (device, inode, size, mtime,
/// ctime) of the file the process runs, so a large binary is hashed once,
/// not on every call; user and group names for [`NAME_TTL`].
///
/// [`NAME_TTL`]: crate::attest_cache::NAME_TTL
#[derive(Debug)]
pub struct UnixAttestor {
    proc_root: PathBuf,
    digests: std::sync::Mutex<std::collections::HashMap<ExeId, String>>,
    names: NameCache,
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
            names: NameCache::default(),
        }
    }

    fn proc(&self, pid: i32) -> PathBuf {
        self.proc_root.join(pid.to_string())
    }

    /// SHA-256 of the open executable `f` whose identity is `id`.
    fn digest(&self, pid: i32, f: &mut std::fs::File, id: ExeId) -> Result<String, AttestError> {
        use std::io::Read;
        if let Some(d) = self.digests.lock().ok().and_then(|c| c.get(&id).cloned()) {
            return Ok(d);
        }
        let mut ctx = Context::new(&SHA256);
        let mut buf = vec![0u8; 1 << 16];
        loop {
            match f.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => ctx.update(&buf[..n]),
                Err(e) => return Err(proc_err(pid, "exe read")(e)),
            }
        }
        let d = hex::encode(ctx.finish());
        // Changed while being read: the digest belongs to no identity.
        if ExeId::of_fd(&*f).map_err(proc_err(pid, "exe"))? != id {
            return Err(AttestError::ImageChanged(pid));
        }
        if let Ok(mut c) = self.digests.lock() {
            if c.len() > 4096 {
                c.clear();
            }
            c.insert(id, d.clone());
        }
        Ok(d)
    }

    fn start_time(&self, pid: i32) -> Result<u64, AttestError> {
        start_time(&self.proc_root, pid)
    }

    fn supplementary_gids(&self, pid: i32) -> Result<Vec<u32>, AttestError> {
        let status = std::fs::read_to_string(self.proc(pid).join("status"))
            .map_err(proc_err(pid, "status"))?;
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

    /// The path of the running executable, if that path (seen from the
    /// process's own root) is the file `id` — not a name since given to
    /// another file, nor a deleted one.
    fn exe_path(&self, pid: i32, id: &ExeId) -> Result<Option<String>, AttestError> {
        let exe = std::fs::read_link(self.proc(pid).join("exe")).map_err(proc_err(pid, "exe"))?;
        let Some(rel) = exe.to_str().and_then(|p| p.strip_prefix('/')) else {
            return Ok(None);
        };
        let at = self.proc(pid).join("root").join(rel);
        Ok(match ExeId::of_path(&at) {
            Ok(found) if found.same_file(id) => Some(exe.display().to_string()),
            _ => None,
        })
    }
}

impl WorkloadAttestor for UnixAttestor {
    fn name(&self) -> &'static str {
        "unix"
    }

    fn attest(&self, c: &Caller) -> Result<Vec<Selector>, AttestError> {
        let pid = c.pid.ok_or(AttestError::NoPid)?;
        let before = self.start_time(pid)?;
        if let Some(p) = &c.pinned {
            p.check_alive()?;
            if before != p.start_time {
                return Err(AttestError::PidReused(pid));
            }
        }
        let mut out = vec![sel(format!("uid:{}", c.uid)), sel(format!("gid:{}", c.gid))];
        if let Some(u) = self.names.user(c.uid) {
            out.push(sel(format!("user:{u}")));
        }
        if let Some(g) = self.names.group(c.gid) {
            out.push(sel(format!("group:{g}")));
        }
        for g in self.supplementary_gids(pid)? {
            out.push(sel(format!("supplementary_gid:{g}")));
        }
        // The very file the process runs, even if its path was replaced.
        let mut f =
            std::fs::File::open(self.proc(pid).join("exe")).map_err(proc_err(pid, "exe"))?;
        let id = ExeId::of_fd(&f).map_err(proc_err(pid, "exe"))?;
        if let Some(p) = &c.pinned
            && id != p.exe
        {
            return Err(AttestError::ImageChanged(pid));
        }
        match self.exe_path(pid, &id)? {
            Some(path) => out.push(sel(format!("path:{path}"))),
            None => {
                tracing::debug!(
                    pid,
                    "executable path no longer names the running file; no path selector"
                );
            }
        }
        out.push(sel(format!("sha256:{}", self.digest(pid, &mut f, id)?)));
        if self.start_time(pid)? != before {
            return Err(AttestError::PidReused(pid));
        }
        if let Some(p) = &c.pinned {
            p.verify(&self.proc_root)?;
        }
        Ok(out)
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
        // Whatever was read about the pid was about the pinned process.
        if let Some(p) = &caller.pinned {
            p.check_alive()?;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn me() -> Caller {
        Caller::new(
            Some(i32::try_from(std::process::id()).expect("pid")),
            nix::unistd::geteuid().as_raw(),
            nix::unistd::getegid().as_raw(),
        )
    }

    #[test]
    fn attests_this_process() {
        let me = me();
        let s = UnixAttestor::default().attest(&me).expect("attest");
        let values: Vec<&str> = s.iter().map(|x| x.value.as_str()).collect();
        assert!(values.contains(&format!("uid:{}", me.uid).as_str()));
        let exe = std::env::current_exe().expect("exe");
        assert!(values.contains(&format!("path:{}", exe.display()).as_str()));
        assert!(
            values
                .iter()
                .any(|v| v.starts_with("sha256:") && v.len() == 7 + 64)
        );
    }

    /// Pinned: the same process and image attest; a pin of another image
    /// (as after an exec) or of another start time (pid reuse) is refused.
    #[test]
    fn pinned_process_must_be_unchanged() {
        let proc_root = Path::new("/proc");
        let mut me = me();
        let pid = me.pid.expect("pid");
        let pidfd = rustix::process::pidfd_open(
            rustix::process::Pid::from_raw(pid).expect("pid"),
            rustix::process::PidfdFlags::empty(),
        )
        .ok();
        let pinned = Pinned::take(pid, pidfd, proc_root).expect("pin");
        pinned.verify(proc_root).expect("unchanged");
        let exe = pinned.exe;
        let start = pinned.start_time;
        me.pinned = Some(Arc::new(pinned));
        UnixAttestor::default().attest(&me).expect("attest pinned");

        let other_image = Pinned {
            pid,
            pidfd: None,
            start_time: start,
            exe: ExeId {
                ctime: (exe.ctime.0 - 1, exe.ctime.1),
                ..exe
            },
        };
        me.pinned = Some(Arc::new(other_image));
        assert_eq!(
            UnixAttestor::default().attest(&me),
            Err(AttestError::ImageChanged(pid))
        );
        let recycled = Pinned {
            pid,
            pidfd: None,
            start_time: start + 1,
            exe,
        };
        me.pinned = Some(Arc::new(recycled));
        assert_eq!(
            UnixAttestor::default().attest(&me),
            Err(AttestError::PidReused(pid))
        );
    }

    /// A pidfd whose process has exited refuses, even if the pid exists.
    #[test]
    fn exited_pinned_process_is_refused() {
        let mut child = std::process::Command::new("true").spawn().expect("true");
        let pid = i32::try_from(child.id()).expect("pid");
        let pidfd = rustix::process::pidfd_open(
            rustix::process::Pid::from_raw(pid).expect("pid"),
            rustix::process::PidfdFlags::empty(),
        )
        .expect("pidfd");
        child.wait().expect("wait");
        let p = Pinned {
            pid,
            pidfd: Some(pidfd),
            start_time: 0,
            exe: ExeId::of_path(Path::new("/proc/self/exe")).expect("exe"),
        };
        assert_eq!(p.check_alive(), Err(AttestError::Exited(pid)));
    }

    #[test]
    fn gone_process_is_refused() {
        let c = Caller::new(Some(i32::MAX - 1), 0, 0);
        assert!(matches!(
            UnixAttestor::default().attest(&c),
            Err(AttestError::Proc { .. })
        ));
        assert_eq!(
            UnixAttestor::default().attest(&Caller::new(None, 0, 0)),
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
        let r = a.attest(&Caller::new(Some(42), 1, 1));
        assert!(matches!(r, Err(AttestError::Proc { .. })), "{r:?}");
        assert_eq!(a.supplementary_gids(42).expect("gids"), vec![10, 20]);
        assert_eq!(a.start_time(42).expect("start"), 111);
    }

    #[test]
    fn start_time_is_field_22_after_the_command_name() {
        let line = b"7 (a) b (c) S 1 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 98765 0 0\n";
        assert_eq!(start_time_field(line, true), Some(98765));
        // A read that stopped inside the field, or right after it, waits
        // for more; at the end of the file the last field counts.
        let end = line.len() - "0 0\n".len();
        let inside = end - " 65".len();
        assert_eq!(start_time_field(&line[..inside], false), None);
        assert_eq!(start_time_field(&line[..inside], true), Some(987));
        assert_eq!(start_time_field(&line[..inside - 8], false), None);
        assert_eq!(start_time_field(&line[..end], false), Some(98765));
        assert_eq!(start_time_field(b"7 (a) S 1", true), None);
        assert_eq!(start_time_field(b"garbage", true), None);
        let pid = i32::try_from(std::process::id()).expect("pid");
        let t = start_time(Path::new("/proc"), pid).expect("own start time");
        let stat = std::fs::read_to_string("/proc/self/stat").expect("stat");
        let rest = stat.rsplit_once(')').expect(")").1;
        assert_eq!(
            rest.split_whitespace().nth(19),
            Some(t.to_string().as_str())
        );
    }
}
