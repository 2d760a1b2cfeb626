//! The datapath state that outlives a `geneflowd` process: one directory per chassis on a BPF
//! filesystem holding the XDP program (`prog`), its maps (`maps-v<ABI>/<NAME>`, one directory per
//! ABI version so an upgrade that changes a map layout never adopts maps it cannot read) and one
//! XDP link per attached interface (`links/<ifindex>`). Pinned links keep the program attached
//! after the process dies; a restarted agent adopts them and, once it has a pipeline, swaps
//! its own program in atomically. The directory is held under an exclusive lock so that two agents never share it.

use geneflow_abi::ABI_VERSION;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use thiserror::Error;

/// `statfs(2)` magic of bpffs.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

#[derive(Debug, Error)]
pub enum PersistError {
    #[error("pin_dir {0}: not on a BPF filesystem (mount one: mount -t bpf bpf /sys/fs/bpf)")]
    NotBpffs(PathBuf),
    #[error("pin_dir {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("pin_dir {0}: in use by another geneflowd")]
    Busy(PathBuf),
}

/// The per-chassis pin directory, locked for the lifetime of this value.
#[derive(Debug)]
pub struct PinDir {
    root: PathBuf,
    _lock: OwnedFd,
}

fn is_bpffs(p: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs(2) fills a plain-data struct we own from a NUL-terminated path.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == BPF_FS_MAGIC
    }
}

impl PinDir {
    /// Opens (creating it if needed) the pin directory `root`, which must be on bpffs.
    pub fn open(root: &Path) -> Result<PinDir, PersistError> {
        let io = |source| PersistError::Io {
            path: root.to_path_buf(),
            source,
        };
        let existing = root.ancestors().find(|a| a.exists()).unwrap_or(root);
        if !is_bpffs(existing) {
            return Err(PersistError::NotBpffs(root.to_path_buf()));
        }
        std::fs::create_dir_all(root.join("links")).map_err(io)?;
        let dir = std::fs::File::open(root).map_err(io)?;
        // SAFETY: flock(2) on a descriptor we own.
        if unsafe { libc::flock(dir.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(PersistError::Busy(root.to_path_buf()));
        }
        let d = PinDir {
            root: root.to_path_buf(),
            _lock: dir.into(),
        };
        std::fs::create_dir_all(d.maps_dir()).map_err(io)?;
        Ok(d)
    }

    pub fn maps_dir(&self) -> PathBuf {
        self.root.join(format!("maps-v{ABI_VERSION}"))
    }

    pub fn map_path(&self, name: &str) -> PathBuf {
        self.maps_dir().join(name)
    }

    pub fn prog_path(&self) -> PathBuf {
        self.root.join("prog")
    }

    pub fn link_path(&self, ifindex: u32) -> PathBuf {
        self.root.join("links").join(ifindex.to_string())
    }

    /// The interfaces a link is pinned for.
    pub fn pinned_links(&self) -> Vec<u32> {
        let Ok(rd) = std::fs::read_dir(self.root.join("links")) else {
            return Vec::new();
        };
        let mut v: Vec<u32> = rd
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse().ok())
            .collect();
        v.sort_unstable();
        v
    }

    /// Removes the maps of other ABI versions (their program, if still attached somewhere,
    /// keeps its own references until it is swapped out). Returns the directories removed.
    pub fn remove_other_abis(&self) -> Vec<String> {
        let mine = format!("maps-v{ABI_VERSION}");
        let mut gone = Vec::new();
        if let Ok(rd) = std::fs::read_dir(&self.root) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with("maps-v")
                    && name != mine
                    && std::fs::remove_dir_all(e.path()).is_ok()
                {
                    gone.push(name);
                }
            }
        }
        gone
    }

    /// Forgets this ABI's pinned maps (e.g. when their layout does not match).
    pub fn reset_maps(&self) -> std::io::Result<()> {
        let _ = std::fs::remove_dir_all(self.maps_dir());
        std::fs::create_dir_all(self.maps_dir())
    }

    /// Removes every pin: the program, links (which detaches them) and maps.
    pub fn remove_all(&self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_a_directory_that_is_not_bpffs() {
        let dir = std::env::temp_dir().join(format!("gf-persist-{}", std::process::id()));
        let e = PinDir::open(&dir.join("ch1")).unwrap_err();
        assert!(matches!(e, PersistError::NotBpffs(_)), "{e}");
        assert!(e.to_string().starts_with("pin_dir "));
        assert!(!dir.exists(), "nothing is created off bpffs");
    }
}
