//! The safe wrapper around DPDK (`dpdk-sys`, feature `dpdk`): the EAL, packet mempools and
//! ethdev ports with their queues. Every `unsafe` call into DPDK is here, each with its
//! `SAFETY:` line; what is above sees owned handles whose `Drop` undoes what they did (a port
//! is stopped and closed, a pool freed, the EAL cleaned up), so an error at any step leaves
//! nothing behind.
//!
//! Above it: `serve` (the poll threads and the calling thread of `geneflowd --datapath
//! dpdk`), `ports` (which device backs each port: an af_packet vdev on a kernel interface,
//! or a PCI NIC or vdev string given with `--dpdk-devargs`), `control` (pipelines, learnt
//! neighbours, expiry) and `inspect` (`geneflowctl` on this datapath). The per-frame work
//! is the sans-IO `crate::userpath`.
//!
//! EAL arguments for a veth in a test: `--no-huge --no-pci --no-shconf -m 256 --vdev
//! net_af_packet0,iface=<veth>`. `--no-huge` forces legacy memory, which `--in-memory`
//! refuses; `--no-shconf` keeps the EAL from writing its files in its runtime directory
//! (/var/run/dpdk/rte), and dropping `Eal` then removes that directory when empty, so
//! nothing is left under /var/run/dpdk.

mod burst;
mod control;
mod eal;
mod inspect;
mod port;
mod ports;
pub mod serve;

pub use burst::{Burst, BURST};
pub use eal::Eal;
pub use port::{EthPort, Mempool, PortStats};

use thiserror::Error;

#[derive(Debug, Error)]
pub enum DpdkError {
    /// The EAL refused its arguments or could not start (DPDK's reason).
    #[error("DPDK EAL refused to start with {args:?}: {reason}")]
    Eal { args: Vec<String>, reason: String },
    #[error("the DPDK EAL was already started in this process (it starts once)")]
    EalTwice,
    #[error(
        "no DPDK port {0:?}: the EAL has no such device (a PCI device must be bound to a DPDK \
         driver such as vfio-pci; a vdev must be given with --vdev or --dpdk-devargs)"
    )]
    NoPort(String),
    #[error("no interface {0:?} to put a DPDK port on (or give its device with --dpdk-devargs)")]
    NoInterface(String),
    /// A `--dpdk-devargs NAME=DEVARGS` that cannot be used (what and why).
    #[error("DPDK device (--dpdk-devargs, TOML dpdk_devargs) {0}")]
    Devargs(String),
    #[error("DPDK port {port}: {op} failed: {reason}")]
    Port {
        port: String,
        op: &'static str,
        reason: String,
    },
    #[error("DPDK out of memory: {0} (give the EAL more with -m, or hugepages)")]
    NoMemory(String),
    #[error("{0:?} contains a NUL byte")]
    Nul(String),
}

/// DPDK's message for an error number (`rte_strerror`).
pub(crate) fn strerror(code: i32) -> String {
    // SAFETY: rte_strerror returns a pointer to a static or thread-local NUL-terminated
    // string, valid until the next call on this thread; we copy it at once.
    unsafe {
        let p = dpdk_sys::rte_strerror(code.abs());
        if p.is_null() {
            return format!("error {code}");
        }
        std::ffi::CStr::from_ptr(p).to_string_lossy().into_owned()
    }
}

/// The thread's `rte_errno`.
pub(crate) fn errno() -> i32 {
    // SAFETY: reads a thread-local integer.
    unsafe { dpdk_sys::gf_errno() }
}
