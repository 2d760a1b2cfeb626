//! The `file` backend keeps the whole NB as one JSON document: readers parse it, writers take
//! an flock, apply their change to the current document, bump its version and replace the
//! file atomically (write to a temporary file, fsync, rename), so a reader never sees a
//! half-written document. Agents watch it by its identity (inode, size, mtime), checked when
//! inotify says its directory changed (within about a millisecond of a write) and every
//! 100 ms anyway (20 ms without inotify), and diff its key/value projection.

use super::{Backend, Event, NbError};
use crate::kv::{self, Kv};
use crate::model::NbDocument;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Where a backend's document stands, for change detection without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    ino: u64,
    size: u64,
    mtime_ns: i128,
}

pub struct FileStore {
    path: PathBuf,
    prefixes: Vec<String>,
    last: Kv,
    last_stamp: Option<Option<Stamp>>,
    /// Wakes `poll` when the document's directory changes; `None`: plain polling.
    watch: Option<inotify::Inotify>,
}

impl FileStore {
    /// Opens `file:///abs/path` or a plain path.
    pub fn open(url: &str) -> Result<FileStore, NbError> {
        let path = if let Some(p) = url.strip_prefix("file://") {
            p
        } else if url.contains("://") {
            return Err(NbError::BadUrl(url.to_string()));
        } else {
            url
        };
        if p_is_empty(path) {
            return Err(NbError::BadUrl(url.to_string()));
        }
        Ok(FileStore {
            path: PathBuf::from(path),
            prefixes: Vec::new(),
            last: Kv::new(),
            last_stamp: None,
            watch: None,
        })
    }

    /// An inotify watch on the document's directory (writers rename into it), if the kernel
    /// gives one.
    fn start_watch(&mut self) {
        if self.watch.is_some() {
            return;
        }
        let dir = match self.path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        use inotify::{Inotify, WatchMask};
        self.watch = Inotify::init().ok().and_then(|i| {
            i.watches()
                .add(
                    &dir,
                    WatchMask::MOVED_TO
                        | WatchMask::CLOSE_WRITE
                        | WatchMask::CREATE
                        | WatchMask::DELETE
                        | WatchMask::MOVED_FROM,
                )
                .ok()
                .map(|_| i)
        });
    }

    /// Waits up to `d` for the directory to change (or `d` when there is no watch).
    fn wait_change(&mut self, d: Duration) {
        let Some(w) = self.watch.as_mut() else {
            std::thread::sleep(d.min(Duration::from_millis(20)));
            return;
        };
        let mut pfd = libc::pollfd {
            fd: std::os::fd::AsRawFd::as_raw_fd(w),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = d.min(Duration::from_millis(100)).as_millis() as libc::c_int;
        // SAFETY: poll(2) on one live pollfd on this stack frame.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        if n > 0 {
            // Drain: the stamp says what changed.
            let mut buf = [0u8; 4096];
            while w
                .read_events(&mut buf)
                .is_ok_and(|mut e| e.next().is_some())
            {}
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn io(&self, source: std::io::Error) -> NbError {
        NbError::Io {
            path: self.path.display().to_string(),
            source,
        }
    }

    /// Current identity of the file; `None` if it does not exist.
    pub fn stamp(&self) -> Option<Stamp> {
        let m = fs::metadata(&self.path).ok()?;
        Some(Stamp {
            ino: m.ino(),
            size: m.size(),
            mtime_ns: m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128,
        })
    }

    /// Reads the document for a writer: a missing file is an empty NB (the first write
    /// creates it).
    pub fn load(&self) -> Result<NbDocument, NbError> {
        match fs::read_to_string(&self.path) {
            Ok(t) => self.parse(&t),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(NbDocument::default()),
            Err(e) => Err(self.io(e)),
        }
    }

    /// Reads the document for an agent: a missing or unreadable file means the NB is
    /// unavailable (deleted by mistake, an unmounted volume), like an unreachable etcd, never
    /// an empty topology that would detach every port.
    fn load_present(&self) -> Result<NbDocument, NbError> {
        match fs::read_to_string(&self.path) {
            Ok(t) => self.parse(&t),
            Err(e) => Err(NbError::Unreachable(format!(
                "{}: {e}",
                self.path.display()
            ))),
        }
    }

    fn parse(&self, text: &str) -> Result<NbDocument, NbError> {
        serde_json::from_str(text).map_err(|e| NbError::Parse {
            path: self.path.display().to_string(),
            line: e.line(),
            column: e.column(),
            msg: e.to_string(),
        })
    }

    /// Applies `f` to the current document under an exclusive lock, checks the result and
    /// writes it back atomically with the version bumped. Returns the new version.
    pub fn update<F>(&self, f: F) -> Result<u64, NbError>
    where
        F: FnOnce(&mut NbDocument) -> Result<(), String>,
    {
        if let Some(dir) = self.path.parent() {
            if !dir.as_os_str().is_empty() {
                fs::create_dir_all(dir).map_err(|e| self.io(e))?;
            }
        }
        let lock_path = self.path.with_extension("lock");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| self.io(e))?;
        // SAFETY: flock on a descriptor we own; released when `lock` is dropped.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(self.io(std::io::Error::last_os_error()));
        }
        let old = self.load()?;
        let mut doc = old.clone();
        f(&mut doc).map_err(NbError::Invalid)?;
        super::check_new_errors(&old, &doc)?;
        kv::bump_versions(&old, &mut doc);
        super::check_record_sizes(&kv::doc_to_kv(&doc))?;
        doc.version = old.version.saturating_add(1);
        let tmp = self
            .path
            .with_extension(format!("tmp.{}", std::process::id()));
        let body = serde_json::to_vec_pretty(&doc).map_err(|e| NbError::Invalid(e.to_string()))?;
        {
            let mut t = File::create(&tmp).map_err(|e| self.io(e))?;
            t.write_all(&body).map_err(|e| self.io(e))?;
            t.write_all(b"\n").map_err(|e| self.io(e))?;
            t.sync_all().map_err(|e| self.io(e))?;
        }
        fs::rename(&tmp, &self.path).map_err(|e| self.io(e))?;
        drop(lock);
        Ok(doc.version)
    }
}

fn filtered(kv: Kv, prefixes: &[String]) -> Kv {
    kv.into_iter()
        .filter(|(k, _)| prefixes.iter().any(|p| k.starts_with(p.as_str())))
        .collect()
}

impl Backend for FileStore {
    fn kind(&self) -> &'static str {
        "file"
    }

    fn snapshot(&mut self, prefixes: &[String]) -> Result<Kv, NbError> {
        self.last_stamp = Some(self.stamp());
        Ok(filtered(kv::doc_to_kv(&self.load_present()?), prefixes))
    }

    fn subscribe(&mut self, prefixes: &[String]) -> Result<(), NbError> {
        self.start_watch();
        self.prefixes = prefixes.to_vec();
        self.last_stamp = Some(self.stamp());
        self.last = filtered(kv::doc_to_kv(&self.load_present()?), prefixes);
        Ok(())
    }

    fn poll(&mut self, timeout: Duration) -> Result<Vec<Event>, NbError> {
        let deadline = Instant::now() + timeout;
        loop {
            let stamp = self.stamp();
            if self.last_stamp != Some(stamp) {
                self.last_stamp = Some(stamp);
                let doc = self.load_present()?;
                let now = filtered(kv::doc_to_kv(&doc), &self.prefixes);
                let (puts, dels) = kv::diff(&self.last, &now);
                self.last = now;
                let mut ev: Vec<Event> = puts.into_iter().map(|(k, v)| Event::Put(k, v)).collect();
                ev.extend(dels.into_iter().map(Event::Delete));
                if !ev.is_empty() {
                    return Ok(ev);
                }
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(Vec::new());
            }
            self.wait_change(deadline - now);
        }
    }

    fn commit(
        &mut self,
        puts: Vec<(String, Vec<u8>)>,
        deletes: Vec<String>,
    ) -> Result<(), NbError> {
        self.update(move |d| {
            let mut kvs = kv::doc_to_kv(d);
            for k in deletes {
                kvs.remove(&k);
            }
            kvs.extend(puts);
            let (nd, errs) = kv::kv_to_doc(&kvs);
            if let Some(e) = errs.into_iter().next() {
                return Err(e);
            }
            let version = d.version;
            *d = nd;
            d.version = version;
            Ok(())
        })
        .map(|_| ())
    }

    fn revision(&mut self, _prefixes: &[String]) -> Result<Option<u64>, NbError> {
        Ok(Some(self.stamp().map_or(0, |s| {
            super::token([s.ino, s.size, s.mtime_ns as u64])
        })))
    }

    fn as_file(&mut self) -> Option<&mut FileStore> {
        Some(self)
    }
}

fn p_is_empty(p: &str) -> bool {
    p.trim().is_empty()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::LogicalSwitch;

    /// Switch "a" with tunnel key `key` (0 is invalid), tenant "t".
    fn switch_a(key: u32) -> LogicalSwitch {
        LogicalSwitch::overlay("a", key, "t")
    }

    /// A scratch directory for one test's NB file, removed when the test ends.
    struct Tmp(PathBuf);

    impl Tmp {
        fn file(&self) -> PathBuf {
            self.0.join("nb.json")
        }
    }

    impl Drop for Tmp {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn tmp(name: &str) -> Tmp {
        let d = std::env::temp_dir().join(format!("gf-nb-test-{}-{}", std::process::id(), name));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        Tmp(d)
    }

    #[test]
    fn write_is_versioned_and_atomic() {
        let t = tmp("v");
        let p = t.file();
        let s = FileStore::open(&format!("file://{}", p.display())).unwrap();
        assert_eq!(s.load().unwrap().version, 0);
        let v = s
            .update(|d| {
                d.switches.insert("a".into(), switch_a(1));
                Ok(())
            })
            .unwrap();
        assert_eq!(v, 1);
        let st = s.stamp().unwrap();
        let v = s.update(|_| Ok(())).unwrap();
        assert_eq!(v, 2);
        assert_ne!(s.stamp().unwrap(), st);
        assert_eq!(s.load().unwrap().switches.len(), 1);
    }

    #[test]
    fn invalid_update_leaves_file_untouched() {
        let t = tmp("inv");
        let p = t.file();
        let s = FileStore::open(p.to_str().unwrap()).unwrap();
        s.update(|_| Ok(())).unwrap();
        let e = s
            .update(|d| {
                d.switches.insert("a".into(), switch_a(0));
                Ok(())
            })
            .unwrap_err();
        assert!(e.to_string().contains("tunnel key 0"));
        assert_eq!(s.load().unwrap().version, 1);
    }

    #[test]
    fn an_oversized_record_is_refused_and_nothing_written() {
        use crate::model::{Direction, EtherType, SecurityGroup, SgRule};
        let t = tmp("big");
        let s = FileStore::open(t.file().to_str().unwrap()).unwrap();
        s.update(|_| Ok(())).unwrap();
        let rules = (0..12_000u16)
            .map(|i| SgRule {
                id: format!("rule-{i}"),
                direction: Direction::Ingress,
                ethertype: EtherType::IPv4,
                protocol: Some("tcp".into()),
                port_min: Some(i),
                port_max: Some(i),
                remote_prefix: None,
                remote_group: None,
            })
            .collect();
        let e = s
            .update(|d| {
                d.security_groups.insert(
                    "big".into(),
                    SecurityGroup {
                        name: "big".into(),
                        tenant: "default".into(),
                        rules,
                        version: 0,
                    },
                );
                Ok(())
            })
            .unwrap_err();
        assert!(
            e.to_string()
                .contains("/gf/t/default/security_groups/big would be"),
            "{e}"
        );
        assert!(e.to_string().contains("over the 1048576-byte limit"), "{e}");
        assert_eq!(s.load().unwrap().version, 1);
    }

    #[test]
    fn malformed_file_reports_position() {
        let t = tmp("bad");
        let p = t.file();
        fs::write(&p, "{\n  \"version\": 1,\n  \"switches\": {,}\n}").unwrap();
        let s = FileStore::open(p.to_str().unwrap()).unwrap();
        let e = s.load().unwrap_err().to_string();
        assert!(e.contains(":3:"), "{e}");
        assert!(e.contains("nb.json"), "{e}");
    }

    #[test]
    fn a_missing_file_is_an_unavailable_nb_for_agents() {
        let t = tmp("gone");
        let p = t.file();
        let mut s = FileStore::open(p.to_str().unwrap()).unwrap();
        // Before the first write: unavailable to an agent, empty to a writer.
        assert!(matches!(s.snapshot(&[]), Err(NbError::Unreachable(_))));
        assert_eq!(s.load().unwrap().version, 0);
        s.update(|_| Ok(())).unwrap();
        s.subscribe(&["/".into()]).unwrap();
        fs::remove_file(&p).unwrap();
        let e = s.poll(Duration::from_millis(100)).unwrap_err();
        assert!(matches!(e, NbError::Unreachable(_)), "{e}");
        assert!(!e.is_data_error());
        assert!(e.to_string().contains("nb.json"), "{e}");
    }

    #[test]
    fn url_schemes() {
        assert!(FileStore::open("etcd://x:2379").is_err());
        assert!(FileStore::open("file://").is_err());
    }

    #[test]
    fn an_agent_watches_the_directory_and_sees_a_write() {
        let t = tmp("watch");
        let p = t.file();
        let mut agent = FileStore::open(p.to_str().unwrap()).unwrap();
        let writer = FileStore::open(p.to_str().unwrap()).unwrap();
        writer.update(|_| Ok(())).unwrap();
        agent.subscribe(&["/".into()]).unwrap();
        assert!(agent.watch.is_some(), "no inotify watch");
        let w = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            let at = Instant::now();
            writer
                .update(|d| {
                    d.switches.insert("a".into(), switch_a(1));
                    Ok(())
                })
                .unwrap();
            at
        });
        let ev = agent.poll(Duration::from_secs(5)).unwrap();
        let written = w.join().unwrap();
        assert!(!ev.is_empty());
        // The write woke the agent (its latency is `cargo xtask bench-nb`'s to measure).
        assert!(written.elapsed() < Duration::from_secs(5));
    }
}
