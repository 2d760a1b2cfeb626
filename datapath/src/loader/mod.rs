//! Loads the XDP object, attaches it to interfaces and owns the typed handles of its maps. All
//! BPF syscalls of the datapath go through here; none of them runs per packet on the hot path
//! (only per new megaflow, per NB change and per sweep). Maps and links are pinned (see
//! `persist`): loading adopts the maps a previous process left and rebuilds the userspace
//! mirrors from them; attaching takes over a pinned link with the previous program still in it,
//! and `swap_in` later replaces that program with ours atomically.

use crate::persist::PinDir;
use crate::pipeline::Megaflow;
use aya::maps::{Array, HashMap, MapData, MapInfo, PerCpuArray, XskMap};
use aya::programs::{Xdp, XdpMode};
use aya::{Ebpf, EbpfLoader};
use geneflow_abi::{
    ct, ctr, nat, Config, CtCacheBlock, CtEntry, CtKey, DpGen, FipCt, FlowAction, FlowKey,
    NatEntry, PortConf, PortCounters, MASK_LISTS, MAX_DATAPATHS, MAX_FIPS, MAX_FLOWS, MAX_MASKS,
    MAX_PEERS, MAX_PORTS, MAX_QUEUES,
};
use std::collections::{BTreeMap, BTreeSet, HashMap as StdHashMap, HashSet as StdHashSet};
use std::mem::size_of;
use std::net::Ipv4Addr;
use std::os::fd::{AsFd, AsRawFd};
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use tracing::{info, warn};

mod conntrack;
mod error;
mod megaflows;
pub use error::LoaderError;
pub use megaflows::{entry, mask_id, FlowWriter, Recorded};
mod nat_table;
mod ports;
pub use ports::PortLink;

const PROG: &str = "geneflow";
/// The same program, frags-aware (XDP multi-buffer), for interfaces whose MTU is larger than
/// `PLAIN_MTU`: a frame there may span several buffers.
const PROG_MB: &str = "geneflow_mb";
/// The largest MTU the plain program serves. Drivers refuse a plain program where a frame
/// may not fit one page (veth at about 3500 bytes, some NIC drivers lower); above a standard
/// Ethernet MTU the multi-buffer one is used, whatever the driver's own limit.
const PLAIN_MTU: u32 = 1500;

/// `BPF_F_MMAPABLE`: SLOW_COUNTERS is created with it.
const MMAPABLE: u32 = 1 << 10;

/// Every pinned map: name, key size, value size, capacity, whether it is memory-mappable. A
/// pinned map that differs in any of these is not adopted.
const MAPS: [(&str, usize, usize, u32, bool); 15] = [
    (
        "FLOWS",
        size_of::<FlowKey>(),
        size_of::<FlowAction>(),
        MAX_FLOWS,
        false,
    ),
    (
        "MASKS",
        4,
        size_of::<FlowKey>(),
        MAX_MASKS * MASK_LISTS,
        false,
    ),
    ("CONFIG", 4, size_of::<Config>(), 1, false),
    ("MASK_HITS", 4, 8, MAX_MASKS * MASK_LISTS, false),
    ("PEER_CACHE", 4, 8, 1, false),
    (
        "CT_CACHE",
        4,
        size_of::<CtCacheBlock>(),
        ct::CACHE_BLOCKS,
        false,
    ),
    (
        "CT",
        size_of::<CtKey>(),
        size_of::<CtEntry>(),
        ct::MAX_ENTRIES,
        false,
    ),
    (
        "NAT",
        size_of::<CtKey>(),
        size_of::<NatEntry>(),
        nat::MAX_ENTRIES,
        false,
    ),
    ("FIP_CT", 4, size_of::<FipCt>(), MAX_FIPS, false),
    ("PORTS", 4, size_of::<PortConf>(), MAX_PORTS, false),
    ("GENS", 4, size_of::<DpGen>(), MAX_DATAPATHS, false),
    ("PEERS", 4, 4, MAX_PEERS, false),
    ("COUNTERS", 4, size_of::<PortCounters>(), MAX_PORTS, false),
    ("XSKS", 4, 4, MAX_PORTS * MAX_QUEUES, false),
    ("SLOW_COUNTERS", 4, 8, MAX_PORTS * ctr::COUNT, true),
];

fn identity_order() -> [u8; MAX_MASKS as usize] {
    std::array::from_fn(|i| i as u8)
}

/// The slow path's counters: the pinned SLOW_COUNTERS array mapped into memory, used as
/// atomics (no syscall per count).
pub struct MappedCounters {
    ptr: std::ptr::NonNull<AtomicU64>,
    len: usize,
    bytes: usize,
    _map: MapData,
}

// SAFETY: the mapping is shared memory owned by this value for its whole life, and it is only
// ever accessed through atomics.
unsafe impl Send for MappedCounters {}
// SAFETY: as above.
unsafe impl Sync for MappedCounters {}

impl std::ops::Deref for MappedCounters {
    type Target = [AtomicU64];

    fn deref(&self) -> &[AtomicU64] {
        // SAFETY: ptr maps `len` u64 values (page-aligned, so aligned for AtomicU64, which has
        // the layout of u64) that stay mapped until drop.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for MappedCounters {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the region mmap returned; no reference outlives self.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.bytes) };
    }
}

/// What a load found on bpffs.
#[derive(Debug, Clone, Copy, Default)]
pub struct Adopted {
    pub megaflows: usize,
    pub masks: usize,
    pub datapaths: usize,
}

fn map_err(name: &'static str) -> impl FnOnce(aya::maps::MapError) -> LoaderError {
    move |source| LoaderError::Map { name, source }
}

/// Where a megaflow install ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Install {
    Installed,
    AlreadyPresent,
    /// The mask list is full or the datapath has no generation (it was just removed).
    Refused,
}

pub struct Bpf {
    ebpf: Ebpf,
    pins: PinDir,
    mode: XdpMode,
    flows: HashMap<MapData, FlowKey, FlowAction>,
    masks: Array<MapData, FlowKey>,
    config: Array<MapData, Config>,
    mask_hits: PerCpuArray<MapData, u64>,
    /// The mask order written to CONFIG, and the hit totals at the last reordering.
    order: [[u8; MAX_MASKS as usize]; MASK_LISTS as usize],
    last_mask_hits: [u64; (MAX_MASKS * MASK_LISTS) as usize],
    /// Generation of the PEERS contents (`Config::peers_gen`).
    peers_gen: u32,
    /// Generation of the PORTS contents (`Config::ports_gen`).
    ports_gen: u32,
    /// Validity epoch of the XDP connection cache (`Config::ct_epoch`).
    ct_epoch: u32,
    /// Conntrack of uplink frames (`Config::ct_uplink`).
    ct_uplink: bool,
    ct: HashMap<MapData, CtKey, CtEntry>,
    nat: HashMap<MapData, CtKey, NatEntry>,
    fip_ct: HashMap<MapData, u32, FipCt>,
    ports: HashMap<MapData, u32, PortConf>,
    gens: Array<MapData, DpGen>,
    peers: HashMap<MapData, u32, u32>,
    xsks: XskMap<MapData>,
    counters: Option<PerCpuArray<MapData, geneflow_abi::PortCounters>>,
    /// Userspace mirrors: the mask lists (`mask_list::*`, as in MASKS), live generations and
    /// installed entries, so the slow path never re-installs what is there and the sweeper
    /// knows what to delete.
    mask_lists: [Vec<FlowKey>; MASK_LISTS as usize],
    /// Each live datapath's slot in GENS and generation.
    book: crate::generations::GenBook,
    installed: StdHashMap<FlowKey, (FlowAction, std::time::Instant)>,
}

/// One installed megaflow, for inspection.
#[derive(Debug, Clone)]
pub struct FlowInfo {
    pub key: FlowKey,
    pub mask: FlowKey,
    pub action: FlowAction,
    pub hits: u64,
    pub age: std::time::Duration,
    pub stale: bool,
}

impl Bpf {
    /// Loads the program with the maps pinned under `pins` (created there if absent or of
    /// another layout) and rebuilds the userspace mirrors from their contents.
    pub fn load(
        object: &[u8],
        skb_mode: bool,
        pins: PinDir,
    ) -> Result<(Bpf, Adopted), LoaderError> {
        for gone in pins.remove_other_abis() {
            info!(dir = %gone, "removed pinned maps of another ABI version");
        }
        let mismatch = MAPS.iter().find(|(name, k, v, n, mmapable)| {
            let path = pins.map_path(name);
            path.exists()
                && !MapInfo::from_pin(&path).is_ok_and(|i| {
                    i.key_size() as usize == *k
                        && i.value_size() as usize == *v
                        && i.max_entries() == *n
                        && (i.map_flags() & MMAPABLE != 0) == *mmapable
                })
        });
        if let Some((name, ..)) = mismatch {
            warn!(
                map = name,
                "pinned maps do not match this program's layout; starting with fresh maps"
            );
            if let Err(e) = pins.reset_maps() {
                warn!("cannot reset pinned maps: {e}");
            }
        }
        let mut loader = EbpfLoader::new();
        for (name, ..) in MAPS {
            loader.map_pin_path(name, pins.map_path(name));
        }
        let mut ebpf = loader.load(object)?;
        for (name, suffix) in [(PROG, ""), (PROG_MB, "_mb")] {
            let prog: &mut Xdp = ebpf
                .program_mut(name)
                .ok_or(LoaderError::MissingMap(name))?
                .try_into()?;
            prog.load()?;
            // The pinned programs are for operators (bpftool); links keep the running one
            // alive.
            let mut prog_path = pins.prog_path().into_os_string();
            prog_path.push(suffix);
            let prog_path = PathBuf::from(prog_path);
            let _ = std::fs::remove_file(&prog_path);
            prog.pin(&prog_path).map_err(|source| LoaderError::Pin {
                path: prog_path.clone(),
                source,
            })?;
        }
        let mut take =
            |name: &'static str| ebpf.take_map(name).ok_or(LoaderError::MissingMap(name));
        let flows = HashMap::try_from(take("FLOWS")?).map_err(map_err("FLOWS"))?;
        let masks = Array::try_from(take("MASKS")?).map_err(map_err("MASKS"))?;
        let config = Array::try_from(take("CONFIG")?).map_err(map_err("CONFIG"))?;
        let mask_hits = PerCpuArray::try_from(take("MASK_HITS")?).map_err(map_err("MASK_HITS"))?;
        let ports = HashMap::try_from(take("PORTS")?).map_err(map_err("PORTS"))?;
        let gens = Array::try_from(take("GENS")?).map_err(map_err("GENS"))?;
        let peers = HashMap::try_from(take("PEERS")?).map_err(map_err("PEERS"))?;
        let ct = HashMap::try_from(take("CT")?).map_err(map_err("CT"))?;
        let nat = HashMap::try_from(take("NAT")?).map_err(map_err("NAT"))?;
        let fip_ct = HashMap::try_from(take("FIP_CT")?).map_err(map_err("FIP_CT"))?;
        let xsks = XskMap::try_from(take("XSKS")?).map_err(map_err("XSKS"))?;
        let counters = PerCpuArray::try_from(take("COUNTERS")?).map_err(map_err("COUNTERS"))?;
        let mut bpf = Bpf {
            ebpf,
            pins,
            mode: if skb_mode {
                XdpMode::Skb
            } else {
                XdpMode::Driver
            },
            flows,
            masks,
            config,
            mask_hits,
            order: Default::default(),
            last_mask_hits: [0; (MAX_MASKS * MASK_LISTS) as usize],
            peers_gen: 0,
            ports_gen: 0,
            ct_epoch: 0,
            ct_uplink: false,
            ct,
            nat,
            fip_ct,
            ports,
            gens,
            peers,
            xsks,
            counters: Some(counters),
            mask_lists: Default::default(),
            book: Default::default(),
            installed: StdHashMap::with_capacity(MAX_FLOWS as usize),
        };
        let adopted = bpf.restore();
        Ok((bpf, adopted))
    }

    /// Rebuilds the mirrors from the (possibly adopted) maps.
    fn restore(&mut self) -> Adopted {
        let cfg = self.config.get(&0, 0).unwrap_or_default();
        self.peers_gen = cfg.peers_gen.wrapping_add(1);
        self.ports_gen = cfg.ports_gen.wrapping_add(1);
        // Continue the adopted epoch: slots cached by the previous process stay invalid.
        self.ct_epoch = cfg.ct_epoch;
        self.next_ct_epoch();
        self.ct_uplink = cfg.ct_uplink != 0;
        for (l, n) in cfg.n_masks.iter().enumerate() {
            let base = l as u32 * MAX_MASKS;
            self.mask_lists[l] = (0..(*n).min(MAX_MASKS))
                .map_while(|i| self.masks.get(&(base + i), 0).ok())
                .collect();
            // An adopted order is kept if it is a permutation of the masks there.
            let n = self.mask_lists[l].len();
            let mut seen: Vec<u8> = cfg.order[l][..n].to_vec();
            seen.sort_unstable();
            self.order[l] = if seen.iter().copied().eq(0..n as u8) {
                cfg.order[l]
            } else {
                identity_order()
            };
        }
        let _ = self.write_config();
        self.adopt_gens();
        let now = std::time::Instant::now();
        let mut top = 0;
        for (k, mut a) in self.flows.iter().flatten() {
            // The mirror holds actions as installed; hits are the kernel's to count.
            a.hits = 0;
            top = top.max(a.generation);
            self.installed.insert(k, (a, now));
        }
        self.book.raise_next(top);
        Adopted {
            megaflows: self.installed.len(),
            masks: self.mask_count(),
            datapaths: self.book.len(),
        }
    }

    /// The slow path's counters, memory-mapped from their pinned map (handed once, to the
    /// shared metrics).
    pub fn slow_counters(&mut self) -> Result<MappedCounters, LoaderError> {
        let map = self
            .ebpf
            .take_map("SLOW_COUNTERS")
            .ok_or(LoaderError::MissingMap("SLOW_COUNTERS"))?;
        let aya::maps::Map::Array(data) = map else {
            return Err(LoaderError::MissingMap("SLOW_COUNTERS"));
        };
        let len = (MAX_PORTS * ctr::COUNT) as usize;
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as usize;
        let bytes = (len * 8).div_ceil(page) * page;
        // SAFETY: maps a BPF array created with BPF_F_MMAPABLE through its own descriptor;
        // the kernel checks the length against the map.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                data.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(LoaderError::Mmap(std::io::Error::last_os_error()));
        }
        Ok(MappedCounters {
            ptr: std::ptr::NonNull::new(p.cast())
                .ok_or(LoaderError::MissingMap("SLOW_COUNTERS"))?,
            len,
            bytes,
            _map: data,
        })
    }

    /// The per-CPU counter map, handed once to the stats reader.
    pub fn take_counters(&mut self) -> Option<PerCpuArray<MapData, geneflow_abi::PortCounters>> {
        self.counters.take()
    }

    /// Removes everything pinned for this chassis (`--cleanup`). Links detach when their last
    /// descriptor closes, i.e. when the caller drops its `PortLink`s.
    pub fn remove_pins(&self) {
        self.pins.remove_all();
    }

    fn write_config(&mut self) -> Result<(), LoaderError> {
        let mut n_masks = [0; MASK_LISTS as usize];
        for (n, list) in n_masks.iter_mut().zip(&self.mask_lists) {
            *n = list.len() as u32;
        }
        self.config
            .set(
                0,
                Config {
                    n_masks,
                    order: self.order,
                    peers_gen: self.peers_gen,
                    ct_uplink: self.ct_uplink as u32,
                    ct_epoch: self.ct_epoch,
                    ports_gen: self.ports_gen,
                },
                0,
            )
            .map_err(map_err("CONFIG"))
    }

    /// Makes `ips` the chassis Geneve is accepted from (the XDP program drops the rest).
    pub fn set_peers(&mut self, ips: &BTreeSet<Ipv4Addr>) -> Result<(), LoaderError> {
        let want: StdHashSet<u32> = ips
            .iter()
            .map(|ip| u32::from_ne_bytes(ip.octets()))
            .collect();
        let have: Vec<u32> = self.peers.keys().flatten().collect();
        let mut changed = false;
        for k in &have {
            if !want.contains(k) {
                let _ = self.peers.remove(k);
                changed = true;
            }
        }
        for k in want {
            if !have.contains(&k) {
                self.peers.insert(k, 1, 0).map_err(map_err("PEERS"))?;
                changed = true;
            }
        }
        if changed {
            // A removed chassis must not stay accepted from a CPU's cache.
            self.peers_gen = self.peers_gen.wrapping_add(1);
            self.write_config()?;
        }
        Ok(())
    }
}
