//! Loads the XDP object, attaches it to interfaces and owns the typed handles of its maps. All
//! BPF syscalls of the datapath go through here; none of them runs per packet on the hot path
//! (only per new megaflow, per NB change and per sweep).

use crate::pipeline::Megaflow;
use aya::maps::{Array, HashMap, MapData, PerCpuArray, XskMap};
use aya::programs::{xdp::XdpLinkId, Xdp, XdpMode};
use aya::Ebpf;
use geneflow_abi::{Config, FlowAction, FlowKey, PortConf, MAX_FLOWS, MAX_MASKS};
use std::collections::HashMap as StdHashMap;
use std::os::fd::AsRawFd;
use thiserror::Error;

const PROG: &str = "geneflow";

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
    #[error("BPF map {0} missing from the object")]
    MissingMap(&'static str),
    #[error("attaching XDP to ifindex {ifindex}: {source}")]
    Attach {
        ifindex: u32,
        #[source]
        source: aya::programs::ProgramError,
    },
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
    mode: XdpMode,
    flows: HashMap<MapData, FlowKey, FlowAction>,
    masks: Array<MapData, FlowKey>,
    config: Array<MapData, Config>,
    ports: HashMap<MapData, u32, PortConf>,
    gens: HashMap<MapData, u32, u32>,
    xsks: XskMap<MapData>,
    counters: Option<PerCpuArray<MapData, geneflow_abi::PortCounters>>,
    /// Userspace mirrors: the mask list, live generations and installed entries, so the slow
    /// path never re-installs what is there and the sweeper knows what to delete.
    mask_list: Vec<FlowKey>,
    live_gens: StdHashMap<u32, u32>,
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
    pub fn load(object: &[u8], skb_mode: bool) -> Result<Bpf, LoaderError> {
        let mut ebpf = Ebpf::load(object)?;
        let prog: &mut Xdp = ebpf
            .program_mut(PROG)
            .ok_or(LoaderError::MissingMap("program geneflow"))?
            .try_into()?;
        prog.load()?;
        let mut take =
            |name: &'static str| ebpf.take_map(name).ok_or(LoaderError::MissingMap(name));
        let flows = HashMap::try_from(take("FLOWS")?).map_err(map_err("FLOWS"))?;
        let masks = Array::try_from(take("MASKS")?).map_err(map_err("MASKS"))?;
        let config = Array::try_from(take("CONFIG")?).map_err(map_err("CONFIG"))?;
        let ports = HashMap::try_from(take("PORTS")?).map_err(map_err("PORTS"))?;
        let gens = HashMap::try_from(take("GENS")?).map_err(map_err("GENS"))?;
        let xsks = XskMap::try_from(take("XSKS")?).map_err(map_err("XSKS"))?;
        let counters = PerCpuArray::try_from(take("COUNTERS")?).map_err(map_err("COUNTERS"))?;
        Ok(Bpf {
            ebpf,
            mode: if skb_mode {
                XdpMode::Skb
            } else {
                XdpMode::Driver
            },
            flows,
            masks,
            config,
            ports,
            gens,
            xsks,
            counters: Some(counters),
            mask_list: Vec::new(),
            live_gens: StdHashMap::new(),
            installed: StdHashMap::with_capacity(MAX_FLOWS as usize),
        })
    }

    /// The per-CPU counter map, handed once to the stats reader.
    pub fn take_counters(&mut self) -> Option<PerCpuArray<MapData, geneflow_abi::PortCounters>> {
        self.counters.take()
    }

    fn prog(&mut self) -> Result<&mut Xdp, LoaderError> {
        Ok(self
            .ebpf
            .program_mut(PROG)
            .ok_or(LoaderError::MissingMap("program geneflow"))?
            .try_into()?)
    }

    /// Registers the interface in PORTS and attaches the program to it.
    pub fn attach(&mut self, ifindex: u32, conf: PortConf) -> Result<XdpLinkId, LoaderError> {
        self.ports
            .insert(ifindex, conf, 0)
            .map_err(map_err("PORTS"))?;
        let mode = self.mode;
        self.prog()?
            .attach_to_if_index(ifindex, mode)
            .map_err(|source| LoaderError::Attach { ifindex, source })
    }

    /// Rewrites an attached interface's configuration (e.g. the uplink's encap IP).
    pub fn update_port(&mut self, ifindex: u32, conf: PortConf) -> Result<(), LoaderError> {
        self.ports
            .insert(ifindex, conf, 0)
            .map_err(map_err("PORTS"))
    }

    pub fn detach(&mut self, ifindex: u32, slot: u32, link: XdpLinkId) {
        if let Ok(p) = self.prog() {
            let _ = p.detach(link);
        }
        let _ = self.ports.remove(&ifindex);
        let _ = self.xsks.unset(slot);
    }

    pub fn set_xsk(&mut self, slot: u32, fd: &impl AsRawFd) -> Result<(), LoaderError> {
        self.xsks
            .set(slot, fd.as_raw_fd(), 0)
            .map_err(map_err("XSKS"))
    }

    /// Marks every entry of these datapaths stale (O(1) per datapath) and forgets removed
    /// datapaths.
    pub fn bump_generations(&mut self, changed: &[u32], live: &[u32]) -> Result<(), LoaderError> {
        for dp in changed {
            if live.contains(dp) {
                let g = self.live_gens.entry(*dp).or_insert(0);
                *g = g.wrapping_add(1);
                let g = *g;
                self.gens.insert(*dp, g, 0).map_err(map_err("GENS"))?;
            } else {
                self.live_gens.remove(dp);
                let _ = self.gens.remove(dp);
            }
        }
        for dp in live {
            if !self.live_gens.contains_key(dp) {
                self.live_gens.insert(*dp, 1);
                self.gens.insert(*dp, 1, 0).map_err(map_err("GENS"))?;
            }
        }
        Ok(())
    }

    pub fn install(&mut self, m: &Megaflow) -> Result<Install, LoaderError> {
        let Some(&generation) = self.live_gens.get(&m.action.dp_key) else {
            return Ok(Install::Refused);
        };
        let id = match self.mask_list.iter().position(|k| *k == m.mask) {
            Some(i) => i,
            None => {
                if self.mask_list.len() >= MAX_MASKS as usize {
                    return Ok(Install::Refused);
                }
                let i = self.mask_list.len();
                self.masks
                    .set(i as u32, m.mask, 0)
                    .map_err(map_err("MASKS"))?;
                self.mask_list.push(m.mask);
                self.config
                    .set(
                        0,
                        Config {
                            n_masks: self.mask_list.len() as u32,
                            pad: 0,
                        },
                        0,
                    )
                    .map_err(map_err("CONFIG"))?;
                i
            }
        };
        let mut key = m.key.masked(&m.mask);
        key.mask_id = id as u8;
        let mut action = m.action;
        action.generation = generation;
        if self.installed.get(&key).map(|(a, _)| a) == Some(&action) {
            return Ok(Install::AlreadyPresent);
        }
        if self.installed.len() >= MAX_FLOWS as usize {
            self.sweep();
            if self.installed.len() >= MAX_FLOWS as usize {
                return Ok(Install::Refused);
            }
        }
        self.flows
            .insert(key, action, 0)
            .map_err(map_err("FLOWS"))?;
        self.installed
            .insert(key, (action, std::time::Instant::now()));
        Ok(Install::Installed)
    }

    /// Deletes entries whose datapath generation moved on. Returns how many were removed.
    pub fn sweep(&mut self) -> usize {
        let gens = &self.live_gens;
        let stale: Vec<FlowKey> = self
            .installed
            .iter()
            .filter(|(_, (a, _))| gens.get(&a.dp_key) != Some(&a.generation))
            .map(|(k, _)| *k)
            .collect();
        for k in &stale {
            let _ = self.flows.remove(k);
            self.installed.remove(k);
        }
        stale.len()
    }

    /// Every installed megaflow with its mask, XDP hit count and age.
    pub fn flows(&self) -> Vec<FlowInfo> {
        let mut out: Vec<FlowInfo> = self
            .installed
            .iter()
            .map(|(k, (a, t))| FlowInfo {
                key: *k,
                mask: self
                    .mask_list
                    .get(k.mask_id as usize)
                    .copied()
                    .unwrap_or_default(),
                action: *a,
                hits: self.flows.get(k, 0).map(|v| v.hits).unwrap_or(0),
                age: t.elapsed(),
                stale: self.live_gens.get(&a.dp_key) != Some(&a.generation),
            })
            .collect();
        out.sort_by_key(|f| std::cmp::Reverse(f.hits));
        out
    }

    pub fn megaflow_count(&self) -> usize {
        self.installed.len()
    }

    pub fn mask_count(&self) -> usize {
        self.mask_list.len()
    }
}
