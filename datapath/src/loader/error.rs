//! What loading the XDP object, attaching it and working its maps can fail with.

use std::path::PathBuf;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum LoaderError {
    #[error("loading the XDP object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("XDP program: {0}")]
    Program(#[from] aya::programs::ProgramError),
    #[error("BPF map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("BPF map {0} is full ({1} entries)")]
    Full(&'static str, u32),
    #[error("BPF map {0} missing from the object")]
    MissingMap(&'static str),
    #[error("attaching XDP to ifindex {ifindex}: {source}")]
    Attach {
        ifindex: u32,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("pinning {path}: {source}")]
    Pin {
        path: PathBuf,
        #[source]
        source: aya::pin::PinError,
    },
    #[error("XDP on ifindex {0} is not a BPF link (kernel too old to pin it)")]
    NotALink(u32),
    #[error("duplicating the descriptor of BPF map {0}: {1}")]
    Dup(&'static str, std::io::Error),
    #[error("mapping SLOW_COUNTERS into memory: {0}")]
    Mmap(std::io::Error),
}
