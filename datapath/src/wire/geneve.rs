//! Geneve (RFC 8926) header codec: a zero-copy [`Packet`] view over a buffer and a validated
//! [`Repr`] with `parse`/`emit`, plus the OVN metadata option (class 0x0102, type 0x80).

use thiserror::Error;

/// Fixed Geneve header length (before options).
pub const HEADER_LEN: usize = 8;
/// Ethertype carried by Geneve for Ethernet payloads (Transparent Ethernet Bridging).
pub const PROTO_ETHERNET: u16 = 0x6558;
/// Length of one option header (class, type, length).
pub const OPTION_HEADER_LEN: usize = 4;
/// OVN option class and type (critical bit set) and its length in bytes.
pub const OVN_CLASS: u16 = 0x0102;
pub const OVN_TYPE: u8 = 0x80;
pub const OVN_OPTION_LEN: usize = OPTION_HEADER_LEN + 4;
/// Type bit marking an option the receiver must understand (RFC 8926 3.5).
pub const TYPE_CRITICAL: u8 = 0x80;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum Error {
    #[error("geneve header truncated: {0} bytes")]
    Truncated(usize),
    #[error("geneve version {0} not supported")]
    BadVersion(u8),
    #[error("geneve options length {opt_len} exceeds the {avail} bytes present")]
    OptionsTruncated { opt_len: usize, avail: usize },
    #[error("geneve option at offset {offset} runs past the options area")]
    BadOptionLength { offset: usize },
    #[error("unknown critical geneve option class {class:#06x} type {typ:#04x}")]
    UnknownCriticalOption { class: u16, typ: u8 },
}

/// A read-only (or, for `T: AsMut<[u8]>`, writable) view of a Geneve header.
#[derive(Debug, Clone)]
pub struct Packet<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Packet<T> {
    /// Wraps a buffer without checking it.
    pub const fn new_unchecked(buffer: T) -> Packet<T> {
        Packet { buffer }
    }

    /// Wraps a buffer and checks that every accessor stays within it.
    pub fn new_checked(buffer: T) -> Result<Packet<T>, Error> {
        let p = Packet::new_unchecked(buffer);
        p.check_len()?;
        Ok(p)
    }

    pub fn check_len(&self) -> Result<(), Error> {
        let len = self.buffer.as_ref().len();
        if len < HEADER_LEN {
            return Err(Error::Truncated(len));
        }
        if len < self.header_len() {
            return Err(Error::OptionsTruncated {
                opt_len: self.options_len(),
                avail: len - HEADER_LEN,
            });
        }
        Ok(())
    }

    pub fn into_inner(self) -> T {
        self.buffer
    }

    pub fn version(&self) -> u8 {
        self.buffer.as_ref()[0] >> 6
    }

    /// Length of the options area in bytes.
    pub fn options_len(&self) -> usize {
        ((self.buffer.as_ref()[0] & 0x3f) as usize) * 4
    }

    /// Header length including options: the offset of the payload.
    pub fn header_len(&self) -> usize {
        HEADER_LEN + self.options_len()
    }

    pub fn oam(&self) -> bool {
        self.buffer.as_ref()[1] & 0x80 != 0
    }

    pub fn critical(&self) -> bool {
        self.buffer.as_ref()[1] & 0x40 != 0
    }

    pub fn protocol(&self) -> u16 {
        let b = self.buffer.as_ref();
        u16::from_be_bytes([b[2], b[3]])
    }

    pub fn vni(&self) -> u32 {
        let b = self.buffer.as_ref();
        u32::from_be_bytes([0, b[4], b[5], b[6]])
    }

    pub fn options(&self) -> &[u8] {
        &self.buffer.as_ref()[HEADER_LEN..self.header_len()]
    }

    pub fn payload(&self) -> &[u8] {
        &self.buffer.as_ref()[self.header_len()..]
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Packet<T> {
    fn set_first_bytes(&mut self, version: u8, opt_len: usize, oam: bool, critical: bool) {
        let b = self.buffer.as_mut();
        b[0] = (version << 6) | ((opt_len / 4) as u8 & 0x3f);
        b[1] = (if oam { 0x80 } else { 0 }) | (if critical { 0x40 } else { 0 });
    }

    pub fn set_protocol(&mut self, proto: u16) {
        self.buffer.as_mut()[2..4].copy_from_slice(&proto.to_be_bytes());
    }

    pub fn set_vni(&mut self, vni: u32) {
        let v = vni.to_be_bytes();
        let b = self.buffer.as_mut();
        b[4..7].copy_from_slice(&v[1..4]);
        b[7] = 0;
    }

    pub fn options_mut(&mut self) -> &mut [u8] {
        let end = self.header_len();
        &mut self.buffer.as_mut()[HEADER_LEN..end]
    }
}

/// One option TLV as found on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GeneveOption<'a> {
    pub class: u16,
    pub typ: u8,
    pub data: &'a [u8],
}

impl GeneveOption<'_> {
    pub fn is_critical(&self) -> bool {
        self.typ & TYPE_CRITICAL != 0
    }
}

/// Iterates the option TLVs of a validated options area.
#[derive(Debug, Clone)]
pub struct OptionIter<'a> {
    rest: &'a [u8],
    offset: usize,
}

impl<'a> OptionIter<'a> {
    pub fn new(options: &'a [u8]) -> Self {
        OptionIter {
            rest: options,
            offset: 0,
        }
    }
}

impl<'a> Iterator for OptionIter<'a> {
    type Item = Result<GeneveOption<'a>, Error>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        if self.rest.len() < OPTION_HEADER_LEN {
            let e = Error::BadOptionLength {
                offset: self.offset,
            };
            self.rest = &[];
            return Some(Err(e));
        }
        let class = u16::from_be_bytes([self.rest[0], self.rest[1]]);
        let typ = self.rest[2];
        let len = ((self.rest[3] & 0x1f) as usize) * 4;
        if OPTION_HEADER_LEN + len > self.rest.len() {
            let e = Error::BadOptionLength {
                offset: self.offset,
            };
            self.rest = &[];
            return Some(Err(e));
        }
        let data = &self.rest[OPTION_HEADER_LEN..OPTION_HEADER_LEN + len];
        self.rest = &self.rest[OPTION_HEADER_LEN + len..];
        self.offset += OPTION_HEADER_LEN + len;
        Some(Ok(GeneveOption { class, typ, data }))
    }
}

/// OVN's logical port metadata: 1 reserved bit, 15-bit ingress port key, 16-bit egress port key
/// (32768..65535 are multicast groups).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct OvnMetadata {
    pub ingress: u16,
    pub egress: u16,
}

impl OvnMetadata {
    pub fn from_value(v: u32) -> Self {
        OvnMetadata {
            ingress: ((v >> 16) & 0x7fff) as u16,
            egress: (v & 0xffff) as u16,
        }
    }

    pub fn value(&self) -> u32 {
        (((self.ingress & 0x7fff) as u32) << 16) | self.egress as u32
    }

    /// The option in wire form, ready to be passed as [`Repr::options`].
    pub fn to_option_bytes(&self) -> [u8; OVN_OPTION_LEN] {
        let mut b = [0u8; OVN_OPTION_LEN];
        b[0..2].copy_from_slice(&OVN_CLASS.to_be_bytes());
        b[2] = OVN_TYPE;
        b[3] = 1;
        b[4..8].copy_from_slice(&self.value().to_be_bytes());
        b
    }
}

/// A validated Geneve header. `options` is the raw options area, already checked to be a
/// well-formed TLV sequence without unknown critical options, so it can be re-emitted verbatim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Repr<'a> {
    pub oam: bool,
    pub critical: bool,
    pub protocol: u16,
    pub vni: u32,
    pub options: &'a [u8],
    /// The OVN metadata option, if present.
    pub ovn: Option<OvnMetadata>,
}

impl<'a> Repr<'a> {
    /// Parses and validates a header. Unknown options without the critical bit are skipped;
    /// an unknown critical option is an error, as RFC 8926 requires.
    pub fn parse(packet: &Packet<&'a [u8]>) -> Result<Repr<'a>, Error> {
        packet.check_len()?;
        if packet.version() != 0 {
            return Err(Error::BadVersion(packet.version()));
        }
        let buf: &'a [u8] = packet.buffer;
        let options = &buf[HEADER_LEN..packet.header_len()];
        let mut ovn = None;
        for opt in OptionIter::new(options) {
            let opt = opt?;
            if opt.class == OVN_CLASS && opt.typ == OVN_TYPE && opt.data.len() == 4 {
                let v = u32::from_be_bytes([opt.data[0], opt.data[1], opt.data[2], opt.data[3]]);
                ovn = Some(OvnMetadata::from_value(v));
            } else if opt.is_critical() {
                return Err(Error::UnknownCriticalOption {
                    class: opt.class,
                    typ: opt.typ,
                });
            }
        }
        Ok(Repr {
            oam: packet.oam(),
            critical: packet.critical(),
            protocol: packet.protocol(),
            vni: packet.vni(),
            options,
            ovn,
        })
    }

    pub fn buffer_len(&self) -> usize {
        HEADER_LEN + self.options.len()
    }

    /// Writes the header into `packet`, which must hold at least `buffer_len()` bytes.
    /// `options` must be a multiple of 4 bytes and at most 252.
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, packet: &mut Packet<T>) {
        debug_assert!(self.options.len().is_multiple_of(4) && self.options.len() <= 252);
        packet.set_first_bytes(0, self.options.len(), self.oam, self.critical);
        packet.set_protocol(self.protocol);
        packet.set_vni(self.vni);
        packet.options_mut().copy_from_slice(self.options);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HDR_OVN: &[u8] = include_bytes!("../../../tests/fixtures/geneve/hdr_ovn.bin");
    const HDR_MULTI: &[u8] = include_bytes!("../../../tests/fixtures/geneve/hdr_multi_opt.bin");
    const HDR_CRIT: &[u8] =
        include_bytes!("../../../tests/fixtures/geneve/hdr_unknown_critical.bin");
    const HDR_V1: &[u8] = include_bytes!("../../../tests/fixtures/geneve/hdr_version1.bin");
    const HDR_PAST: &[u8] = include_bytes!("../../../tests/fixtures/geneve/hdr_opt_past_end.bin");
    const HDR_TRUNC: &[u8] = include_bytes!("../../../tests/fixtures/geneve/hdr_truncated.bin");

    const META: OvnMetadata = OvnMetadata {
        ingress: 5,
        egress: 7,
    };

    #[test]
    fn parse_scapy_ovn_header() {
        let p = Packet::new_checked(HDR_OVN).unwrap();
        let r = Repr::parse(&p).unwrap();
        assert_eq!(r.vni, 0xabcd);
        assert_eq!(r.protocol, PROTO_ETHERNET);
        assert!(r.critical && !r.oam);
        assert_eq!(r.ovn, Some(META));
        assert_eq!(p.header_len(), 16);
    }

    #[test]
    fn emit_matches_scapy_bytes() {
        let opt = META.to_option_bytes();
        let r = Repr {
            oam: false,
            critical: true,
            protocol: PROTO_ETHERNET,
            vni: 0xabcd,
            options: &opt,
            ovn: Some(META),
        };
        let mut buf = [0xffu8; 16];
        let mut p = Packet::new_unchecked(&mut buf[..]);
        r.emit(&mut p);
        assert_eq!(&buf[..], HDR_OVN);
    }

    #[test]
    fn unknown_noncritical_option_is_skipped() {
        let p = Packet::new_checked(HDR_MULTI).unwrap();
        let r = Repr::parse(&p).unwrap();
        assert_eq!(r.ovn, Some(META));
        assert_eq!(r.options.len(), 20);
        let opts: Vec<_> = OptionIter::new(r.options)
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(opts.len(), 2);
        assert_eq!(
            (opts[0].class, opts[0].typ, opts[0].data.len()),
            (0xffff, 1, 8)
        );
        // Round trip keeps the unknown option verbatim.
        let mut buf = vec![0u8; r.buffer_len()];
        r.emit(&mut Packet::new_unchecked(&mut buf[..]));
        assert_eq!(&buf[..], HDR_MULTI);
    }

    #[test]
    fn malformed_headers_are_rejected_with_reason() {
        let p = Packet::new_checked(HDR_CRIT).unwrap();
        assert_eq!(
            Repr::parse(&p),
            Err(Error::UnknownCriticalOption {
                class: 0xffff,
                typ: 0x81
            })
        );
        let p = Packet::new_checked(HDR_V1).unwrap();
        assert_eq!(Repr::parse(&p), Err(Error::BadVersion(1)));
        let p = Packet::new_checked(HDR_PAST).unwrap();
        assert_eq!(Repr::parse(&p), Err(Error::BadOptionLength { offset: 0 }));
        assert_eq!(
            Packet::new_checked(HDR_TRUNC).unwrap_err(),
            Error::Truncated(6)
        );
    }

    #[test]
    fn options_area_longer_than_buffer() {
        let mut b = HDR_OVN.to_vec();
        b.truncate(12);
        assert_eq!(
            Packet::new_checked(&b[..]).unwrap_err(),
            Error::OptionsTruncated {
                opt_len: 8,
                avail: 4
            }
        );
    }

    #[test]
    fn metadata_value_layout() {
        let m = OvnMetadata {
            ingress: 0x7fff,
            egress: 0x8000,
        };
        assert_eq!(m.value(), 0x7fff_8000);
        assert_eq!(OvnMetadata::from_value(0xffff_8001).ingress, 0x7fff);
        assert_eq!(OvnMetadata::from_value(0xffff_8001).egress, 0x8001);
    }

    #[test]
    fn parse_never_panics_on_arbitrary_bytes() {
        // Deterministic pseudo-random sweep standing in for a fuzzer run in the unit suite.
        let mut x: u64 = 0x1234_5678;
        for len in 0..64 {
            for _ in 0..200 {
                let mut buf = vec![0u8; len];
                for b in buf.iter_mut() {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    *b = x as u8;
                }
                if let Ok(p) = Packet::new_checked(&buf[..]) {
                    let _ = Repr::parse(&p);
                }
            }
        }
    }
}
