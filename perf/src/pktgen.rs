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
    pub csum_off_b: u32,
    pub field2_off: u32,
    pub base2: u32,
    pub csum2_off: u32,
    pub csum2_off_b: u32,
    pub pad: u32,
}

/// The template head the generator restores on every run (see `HEAD` in perf/xdp).
const HEAD_WORDS: usize = 8;

// SAFETY: repr(C), integers only, no padding.
unsafe impl aya::Pod for GenConf {}

/// A 16-bit field of a template the generator stamps, and the checksums covering it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Field {
    pub off: u32,
    /// The template's value: frames carry base, base + 1, ...
    pub base: u16,
    /// Offsets of up to two checksums covering the field (0 = none to fix).
    pub csums: [u32; 2],
}

impl Field {
    fn shifted(self, by: u32) -> Field {
        Field {
            off: self.off + by,
            base: self.base,
            csums: self.csums.map(|c| if c != 0 { c + by } else { 0 }),
        }
    }
}

/// A frame to replay, the 16-bit field that varies per flow and, optionally, a second one
/// that moves on after each round of the first (so the pair goes through flows x 65,536
/// combinations: more connections than a conntrack table holds).
#[derive(Debug, Clone)]
pub struct Template {
    pub frame: Vec<u8>,
    pub field: Field,
    pub field2: Option<Field>,
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
    /// Last two bytes of the destination IPv4 address (likewise).
    DstIp,
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
    Ok(Template {
        field: field(s, vary, 0),
        frame,
        field2: None,
    })
}

/// A DHCP DISCOVER from `s.src_mac` (UDP 68 -> 67, from 0.0.0.0 to broadcast whatever `s`
/// says of addresses and ports), padded to BOOTP's 300 bytes: the load of the DHCP benchmark.
/// Built by hand: the generator needs one fixed frame, and the product's own DHCP code
/// (smoltcp) must not be what builds the frames that test it.
pub fn dhcp_discover_template(s: &UdpSpec) -> Result<Template> {
    let mut bootp = vec![0u8; 300];
    bootp[0] = 1; // BOOTREQUEST
    bootp[1] = 1; // Ethernet
    bootp[2] = 6;
    bootp[4..8].copy_from_slice(&0x4246_4c57u32.to_be_bytes()); // xid
    bootp[10] = 0x80; // broadcast flag
    bootp[28..34].copy_from_slice(&s.src_mac);
    bootp[236..240].copy_from_slice(&[0x63, 0x82, 0x53, 0x63]);
    bootp[240..244].copy_from_slice(&[53, 1, 1, 255]); // DISCOVER, end
    let b = PacketBuilder::ethernet2(s.src_mac, [0xff; 6])
        .ipv4([0, 0, 0, 0], [255, 255, 255, 255], 64)
        .udp(68, 67);
    let mut frame = Vec::with_capacity(b.size(bootp.len()));
    b.write(&mut frame, &bootp)?;
    Ok(Template {
        // The "varied" field is the xid's first half, rewritten with its own value (one flow):
        // the UDP checksum stays right.
        field: Field {
            off: 42 + 4,
            base: 0x4246,
            csums: [0, 0],
        },
        frame,
        field2: None,
    })
}

/// Offsets in an Ethernet/IPv4 frame (no options).
const IP_CSUM: u32 = 24;
const TCP_CSUM: u32 = 50;

fn field(s: &UdpSpec, vary: Vary, l4_csum: u32) -> Field {
    let (off, base, csums) = match vary {
        Vary::SrcPort => (34, s.sport, [l4_csum, 0]),
        Vary::SrcMac => (10, u16::from_be_bytes([s.src_mac[4], s.src_mac[5]]), [0, 0]),
        Vary::DstMac => (4, u16::from_be_bytes([s.dst_mac[4], s.dst_mac[5]]), [0, 0]),
        Vary::SrcIp => {
            let o = s.src_ip.octets();
            (28, u16::from_be_bytes([o[2], o[3]]), [IP_CSUM, l4_csum])
        }
        Vary::DstIp => {
            let o = s.dst_ip.octets();
            (32, u16::from_be_bytes([o[2], o[3]]), [IP_CSUM, l4_csum])
        }
    };
    Field { off, base, csums }
}

/// A TCP SYN (a connection attempt, no data) in a frame of `s.size` bytes at least 60, every
/// checksum right;
/// `vary` and `vary2` (the second field) are kept right by the generator's incremental
/// updates.
pub fn tcp_syn_template(s: &UdpSpec, vary: Vary, vary2: Option<Vary>) -> Result<Template> {
    let b = PacketBuilder::ethernet2(s.src_mac, s.dst_mac)
        .ipv4(s.src_ip.octets(), s.dst_ip.octets(), 64)
        .tcp(s.sport, s.dport, 1, 64240)
        .syn();
    let mut frame = Vec::with_capacity(s.size.max(60));
    b.write(&mut frame, &[])?;
    // No data: Ethernet padding up to the frame size.
    frame.resize(s.size.max(60), 0);
    Ok(Template {
        field: field(s, vary, TCP_CSUM),
        field2: vary2.map(|v| field(s, v, TCP_CSUM)),
        frame,
    })
}

/// `inner` encapsulated in Geneve with the OVN option; the varied fields move with it.
pub fn geneve_template(inner: &Template, outer: &EncapParams) -> Result<Template> {
    let mut buf = vec![0u8; inner.frame.len() + 64];
    let mut p = *outer;
    p.udp_csum = false;
    let n = emit_encap(&mut buf, &inner.frame, &p).context("encap")?;
    buf.truncate(n);
    let shift = (n - inner.frame.len()) as u32;
    Ok(Template {
        frame: buf,
        field: inner.field.shifted(shift),
        field2: inner.field2.map(|f| f.shifted(shift)),
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
    /// A generator transmitting `t` out of `iface` (XDP_TX), `flows` distinct values;
    /// `restore`: the template's head is written back before each frame (see `HEAD`).
    pub fn new(t: &Template, flows: u32, iface: &str, restore: bool) -> Result<Generator> {
        let mut ebpf = load()?;
        let mut gen: Array<_, GenConf> = Array::try_from(ebpf.map_mut("GEN").context("GEN map")?)?;
        gen.set(
            0,
            GenConf {
                flows: flows.max(1),
                field_off: t.field.off,
                base: t.field.base as u32,
                csum_off: t.field.csums[0],
                redirect_ifindex: 0,
                head_words: if restore {
                    (t.frame.len() / 8).min(HEAD_WORDS) as u32
                } else {
                    0
                },
                csum_off_b: t.field.csums[1],
                field2_off: t.field2.map_or(0, |f| f.off),
                base2: t.field2.map_or(0, |f| f.base as u32),
                csum2_off: t.field2.map_or(0, |f| f.csums[0]),
                csum2_off_b: t.field2.map_or(0, |f| f.csums[1]),
                pad: 0,
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
        Self::with_program(ebpf, "gf_pktgen", t, iface)
    }

    /// The minimal live-frames generator: `gf_pktgen_min` transmits the template as it is.
    pub fn minimal(t: &Template, iface: &str) -> Result<Generator> {
        Self::with_program(load()?, "gf_pktgen_min", t, iface)
    }

    /// Loads program `name` of `ebpf` (its maps set up) as the generator of `t` on `iface`.
    fn with_program(mut ebpf: Ebpf, name: &str, t: &Template, iface: &str) -> Result<Generator> {
        let prog: &mut Xdp = ebpf
            .program_mut(name)
            .context(name.to_string())?
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
        pin_to_current_cpu();
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

/// Keeps the calling thread on the CPU it runs on. The program's position among the flows is
/// per CPU (no atomic per frame): a generator that moved between CPUs would send the first
/// values of its range from each and never the last ones (10 generators of 10,000 flows each
/// covered 5,600 on this 2-core machine).
fn pin_to_current_cpu() {
    // SAFETY: plain libc calls on a cpu_set_t we own.
    unsafe {
        let cpu = libc::sched_getcpu();
        if cpu < 0 {
            return;
        }
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu as usize, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
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
    /// `lookup`: `gf_redirect_lookup` (one megaflow-shaped hash lookup first) instead of
    /// `gf_redirect`.
    pub fn attach(from: &str, to: &str, lookup: bool) -> Result<Redirect> {
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
        let name = if lookup {
            "gf_redirect_lookup"
        } else {
            "gf_redirect"
        };
        let prog: &mut Xdp = ebpf.program_mut(name).context(name)?.try_into()?;
        prog.load()?;
        let link = prog.attach(from, XdpMode::Driver)?;
        Ok(Redirect {
            _ebpf: ebpf,
            _link: link,
        })
    }
}

/// `gf_pass` on an interface (see the program), detached on drop.
pub struct Pass {
    _ebpf: Ebpf,
    _link: XdpLinkId,
}

impl Pass {
    pub fn attach(iface: &str) -> Result<Pass> {
        let mut ebpf = load()?;
        let prog: &mut Xdp = ebpf.program_mut("gf_pass").context("gf_pass")?.try_into()?;
        prog.load()?;
        let link = prog
            .attach(iface, XdpMode::Driver)
            .with_context(|| format!("attaching gf_pass to {iface}"))?;
        Ok(Pass {
            _ebpf: ebpf,
            _link: link,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::{PacketHeaders, TransportHeader};

    fn spec() -> UdpSpec {
        UdpSpec {
            src_mac: [2, 0, 0, 0, 0, 1],
            dst_mac: [2, 0, 0, 0, 0, 2],
            src_ip: Ipv4Addr::new(10, 0, 0, 1),
            dst_ip: Ipv4Addr::new(10, 1, 2, 3),
            sport: 1024,
            dport: 80,
            size: 64,
        }
    }

    /// Rewrites `f` in `frame` to `v` the way gf_pktgen does (RFC 1624 on each checksum).
    fn stamp(frame: &mut [u8], f: Field, v: u16) {
        let o = f.off as usize;
        let old = u16::from_be_bytes([frame[o], frame[o + 1]]);
        frame[o..o + 2].copy_from_slice(&v.to_be_bytes());
        for c in f.csums.into_iter().filter(|&c| c != 0) {
            let c = c as usize;
            let hc = u16::from_be_bytes([frame[c], frame[c + 1]]);
            let mut s = (!hc as u32) + (!old as u32) + v as u32;
            s = (s & 0xffff) + (s >> 16);
            s = (s & 0xffff) + (s >> 16);
            frame[c..c + 2].copy_from_slice(&(!(s as u16)).to_be_bytes());
        }
    }

    #[test]
    fn syn_template_stays_valid_when_both_fields_are_stamped() {
        let t = tcp_syn_template(&spec(), Vary::SrcPort, Some(Vary::DstIp)).unwrap();
        let mut frame = t.frame.clone();
        stamp(&mut frame, t.field, 40000);
        stamp(&mut frame, t.field2.unwrap(), 0x0909);
        let h = PacketHeaders::from_ethernet_slice(&frame).unwrap();
        let Some(etherparse::NetHeaders::Ipv4(ip, _)) = h.net else {
            panic!("not IPv4")
        };
        assert_eq!(ip.destination, [10, 1, 9, 9]);
        assert_eq!(ip.header_checksum, ip.calc_header_checksum());
        let Some(TransportHeader::Tcp(tcp)) = h.transport else {
            panic!("not TCP")
        };
        assert!(tcp.syn && !tcp.ack);
        assert_eq!((tcp.source_port, tcp.destination_port), (40000, 80));
        let want = tcp.calc_checksum_ipv4(&ip, h.payload.slice()).unwrap();
        assert_eq!(tcp.checksum, want);
    }
}
