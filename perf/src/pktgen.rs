//! The XDP live-frames packet generator and the counting sink. The generator runs the
//! `gf_pktgen` program with BPF_PROG_RUN and BPF_F_TEST_XDP_LIVE_FRAMES: the kernel runs it on
//! copies of a template frame, the program stamps a per-flow value (UDP source port, MAC or
//! address bytes) and transmits with XDP_TX out of the interface given as ingress. The sink is
//! an XDP program that counts and drops.

use anyhow::{bail, Context, Result};
use aya::maps::{Array, MapData, PerCpuArray};
use aya::programs::{xdp::XdpLinkId, Xdp, XdpMode};
use aya::Ebpf;
use etherparse::PacketBuilder;
use geneflow_datapath::pipeline::{emit_encap, EncapParams};
use geneflow_datapath::wire::geneve::OvnMetadata;
use std::net::Ipv4Addr;
use std::os::fd::{AsFd, AsRawFd};
use std::time::{Duration, Instant};

pub const PERF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/geneflow-perf-xdp"));

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct GenConf {
    pub flows: u32,
    pub field_off: u32,
    pub base: u32,
    pub csum_off: u32,
    pub redirect_ifindex: u32,
    /// 8-byte words of the template's head the program writes back before every stamp.
    pub head_words: u32,
}

/// The template head the generator restores on every run (see `HEAD` in perf/xdp).
const HEAD_WORDS: usize = 8;

// SAFETY: repr(C), integers only, no padding.
unsafe impl aya::Pod for GenConf {}

/// A frame to replay and the 16-bit field that varies per flow.
#[derive(Debug, Clone)]
pub struct Template {
    pub frame: Vec<u8>,
    pub field_off: u32,
    pub base: u16,
    /// Offset of a checksum covering the field (0 = none to fix).
    pub csum_off: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Vary {
    /// UDP source port (UDP checksum is zero, nothing to fix).
    SrcPort,
    /// Last two bytes of the source MAC.
    SrcMac,
    /// Last two bytes of the destination MAC (every frame a new destination).
    DstMac,
    /// Last two bytes of the source IPv4 address (IPv4 checksum fixed incrementally).
    SrcIp,
}

pub struct UdpSpec {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub src_ip: Ipv4Addr,
    pub dst_ip: Ipv4Addr,
    pub sport: u16,
    pub dport: u16,
    /// Whole Ethernet frame size (without FCS), at least 60.
    pub size: usize,
}

/// An IPv4/UDP frame; the UDP checksum is left zero so varied fields need no fix-up there.
pub fn udp_template(s: &UdpSpec, vary: Vary) -> Result<Template> {
    let payload_len = s.size.max(60).saturating_sub(42);
    let payload = vec![0x5au8; payload_len];
    let b = PacketBuilder::ethernet2(s.src_mac, s.dst_mac)
        .ipv4(s.src_ip.octets(), s.dst_ip.octets(), 64)
        .udp(s.sport, s.dport);
    let mut frame = Vec::with_capacity(b.size(payload.len()));
    b.write(&mut frame, &payload)?;
    frame[40] = 0;
    frame[41] = 0;
    let (field_off, base, csum_off) = match vary {
        Vary::SrcPort => (34, s.sport, 0),
        Vary::SrcMac => (10, u16::from_be_bytes([s.src_mac[4], s.src_mac[5]]), 0),
        Vary::DstMac => (4, u16::from_be_bytes([s.dst_mac[4], s.dst_mac[5]]), 0),
        Vary::SrcIp => {
            let o = s.src_ip.octets();
            (28, u16::from_be_bytes([o[2], o[3]]), 24)
        }
    };
    Ok(Template {
        frame,
        field_off,
        base,
        csum_off,
    })
}

/// `inner` encapsulated in Geneve with the OVN option; the varied field moves with it.
pub fn geneve_template(inner: &Template, outer: &EncapParams) -> Result<Template> {
    let mut buf = vec![0u8; inner.frame.len() + 64];
    let mut p = *outer;
    p.udp_csum = false;
    let n = emit_encap(&mut buf, &inner.frame, &p).context("encap")?;
    buf.truncate(n);
    let shift = (n - inner.frame.len()) as u32;
    Ok(Template {
        frame: buf,
        field_off: inner.field_off + shift,
        base: inner.base,
        csum_off: if inner.csum_off != 0 {
            inner.csum_off + shift
        } else {
            0
        },
    })
}

pub fn ovn(ingress: u16, egress: u16) -> OvnMetadata {
    OvnMetadata { ingress, egress }
}

fn load() -> Result<Ebpf> {
    Ebpf::load(PERF_OBJECT).context("loading the benchmark XDP object")
}

pub fn ifindex(name: &str) -> Result<u32> {
    geneflow_datapath::netdev::ifindex(name).with_context(|| format!("no interface {name}"))
}

pub struct Generator {
    _ebpf: Ebpf,
    prog_fd: i32,
    frame: Vec<u8>,
    ifindex: u32,
}

const BPF_PROG_TEST_RUN: libc::c_long = 10;
const BPF_F_TEST_XDP_LIVE_FRAMES: u32 = 1 << 1;

#[repr(C)]
#[derive(Default)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    pad: u32,
}

#[repr(C)]
#[derive(Default)]
struct XdpMd {
    data: u32,
    data_end: u32,
    data_meta: u32,
    ingress_ifindex: u32,
    rx_queue_index: u32,
    egress_ifindex: u32,
}

impl Generator {
    /// A generator transmitting `t` out of `iface` (XDP_TX), `flows` distinct values.
    pub fn new(t: &Template, flows: u32, iface: &str) -> Result<Generator> {
        let mut ebpf = load()?;
        let mut gen: Array<_, GenConf> = Array::try_from(ebpf.map_mut("GEN").context("GEN map")?)?;
        gen.set(
            0,
            GenConf {
                flows: flows.max(1),
                field_off: t.field_off,
                base: t.base as u32,
                csum_off: t.csum_off,
                redirect_ifindex: 0,
                head_words: (t.frame.len() / 8).min(HEAD_WORDS) as u32,
            },
            0,
        )?;
        let mut head = [0u64; HEAD_WORDS];
        for (w, b) in head.iter_mut().zip(t.frame.chunks_exact(8)) {
            *w = u64::from_ne_bytes(b.try_into().expect("8 bytes"));
        }
        let mut hm: Array<_, [u64; HEAD_WORDS]> =
            Array::try_from(ebpf.map_mut("HEAD").context("HEAD map")?)?;
        hm.set(0, head, 0)?;
        let prog: &mut Xdp = ebpf
            .program_mut("gf_pktgen")
            .context("gf_pktgen")?
            .try_into()?;
        prog.load()?;
        let prog_fd = prog.fd()?.as_fd().as_raw_fd();
        Ok(Generator {
            _ebpf: ebpf,
            prog_fd,
            frame: t.frame.clone(),
            ifindex: ifindex(iface)?,
        })
    }

    /// Sends `n` frames (one BPF_PROG_RUN).
    pub fn burst(&self, n: u32) -> Result<()> {
        let md = XdpMd {
            data_end: self.frame.len() as u32,
            ingress_ifindex: self.ifindex,
            ..Default::default()
        };
        let attr = TestRunAttr {
            prog_fd: self.prog_fd as u32,
            data_size_in: self.frame.len() as u32,
            data_in: self.frame.as_ptr() as u64,
            repeat: n,
            ctx_size_in: std::mem::size_of::<XdpMd>() as u32,
            ctx_in: &md as *const XdpMd as u64,
            flags: BPF_F_TEST_XDP_LIVE_FRAMES,
            batch_size: 256,
            ..Default::default()
        };
        // SAFETY: bpf(2) with a correctly laid out, fully initialised attribute block whose
        // pointers (frame, ctx) outlive the call.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_PROG_TEST_RUN,
                &attr as *const TestRunAttr,
                std::mem::size_of::<TestRunAttr>() as u32,
            )
        };
        if rc != 0 {
            bail!("BPF_PROG_RUN: {}", std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Sends up to `count` frames (0 = unbounded) for at most `duration`, at `rate` pps
    /// (0 = flat out). Calls `progress` about twice a second. Returns frames sent.
    pub fn run(
        &self,
        count: u64,
        duration: Duration,
        rate: u64,
        mut progress: impl FnMut(u64, Duration),
    ) -> Result<u64> {
        let start = Instant::now();
        let mut sent = 0u64;
        let mut last = Instant::now();
        // Every BPF_PROG_RUN call attaches the program to the XDP dispatcher and detaches it
        // again, which waits for an RCU grace period (milliseconds, the process in D state):
        // flat out, each call is sized to last about CALL_TARGET at the rate measured so far
        // (never past the deadline), so that wait is amortised. Measured on a 2-core VM:
        // 65,536 frames per call gave ~1.2-2 Mpps into an XDP_DROP peer, calls of ~100 ms
        // give the rate a live-frames loop can reach.
        const CALL_TARGET: Duration = Duration::from_millis(100);
        let mut flat_chunk: u64 = 65_536;
        while (count == 0 || sent < count) && start.elapsed() < duration {
            let mut n = if rate == 0 {
                flat_chunk
            } else {
                (rate / 200).clamp(1, 65_536)
            };
            if count != 0 {
                n = n.min(count - sent);
            }
            if rate != 0 {
                let due = (start.elapsed().as_secs_f64() * rate as f64) as u64;
                if sent >= due {
                    std::thread::sleep(Duration::from_micros(500));
                    continue;
                }
                n = n.min(due - sent + 1);
            }
            let t = Instant::now();
            self.burst(n as u32)?;
            sent += n;
            if rate == 0 {
                let pps = n as f64 / t.elapsed().as_secs_f64().max(1e-6);
                let left = duration.saturating_sub(start.elapsed()).min(CALL_TARGET);
                flat_chunk = ((pps * left.as_secs_f64()) as u64).clamp(1024, u32::MAX as u64);
            }
            if last.elapsed() > Duration::from_millis(500) {
                last = Instant::now();
                progress(sent, start.elapsed());
            }
        }
        Ok(sent)
    }
}

/// An XDP program attached to an interface that counts and drops.
pub struct Sink {
    ebpf: Ebpf,
    _link: XdpLinkId,
}

impl Sink {
    pub fn attach(iface: &str) -> Result<Sink> {
        let mut ebpf = load()?;
        let prog: &mut Xdp = ebpf.program_mut("gf_sink").context("gf_sink")?.try_into()?;
        prog.load()?;
        let link = prog
            .attach(iface, XdpMode::Driver)
            .with_context(|| format!("attaching the sink to {iface}"))?;
        Ok(Sink { ebpf, _link: link })
    }

    /// (packets, bytes) so far.
    pub fn count(&self) -> Result<(u64, u64)> {
        let m: PerCpuArray<&MapData, u64> =
            PerCpuArray::try_from(self.ebpf.map("SINK").context("SINK map")?)?;
        let p: u64 = m.get(&0, 0)?.iter().sum();
        let b: u64 = m.get(&1, 0)?.iter().sum();
        Ok((p, b))
    }
}

/// A plain XDP redirect from one interface to another (the baseline).
pub struct Redirect {
    _ebpf: Ebpf,
    _link: XdpLinkId,
}

impl Redirect {
    pub fn attach(from: &str, to: &str) -> Result<Redirect> {
        let mut ebpf = load()?;
        let mut gen: Array<_, GenConf> = Array::try_from(ebpf.map_mut("GEN").context("GEN map")?)?;
        gen.set(
            0,
            GenConf {
                redirect_ifindex: ifindex(to)?,
                ..Default::default()
            },
            0,
        )?;
        let prog: &mut Xdp = ebpf
            .program_mut("gf_redirect")
            .context("gf_redirect")?
            .try_into()?;
        prog.load()?;
        let link = prog.attach(from, XdpMode::Driver)?;
        Ok(Redirect {
            _ebpf: ebpf,
            _link: link,
        })
    }
}
