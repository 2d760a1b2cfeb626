//! One rtnetlink request and its answers, on a connected socket with a receive timeout: what
//! the neighbour resolver and the veth GRO helper both send.

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_DUMP, NLM_F_MULTIPART,
};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};
use std::os::fd::AsRawFd;
use std::time::Duration;

/// Sends one rtnetlink request on connected socket `sock` and collects its answers (until the
/// end of a dump, an ACK or an error, or the single answer of a plain request). Blocks at most
/// the socket's receive timeout.
pub(crate) fn request(
    sock: &Socket,
    buf: &mut [u8],
    seq: u32,
    msg: RouteNetlinkMessage,
    flags: u16,
) -> std::io::Result<Vec<RouteNetlinkMessage>> {
    let mut hdr = NetlinkHeader::default();
    hdr.flags = flags;
    hdr.sequence_number = seq;
    let mut req = NetlinkMessage::new(hdr, NetlinkPayload::from(msg));
    req.finalize();
    let mut out = vec![0u8; req.buffer_len()];
    req.serialize(&mut out);
    sock.send(&out, 0)?;
    let dump = flags & NLM_F_DUMP == NLM_F_DUMP;
    let ack = flags & NLM_F_ACK != 0;
    let mut got = Vec::new();
    loop {
        let n = sock.recv(&mut &mut buf[..], 0)?;
        let mut off = 0;
        while off < n.min(buf.len()) {
            let m = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&buf[off..n])
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
            let len = m.header.length as usize;
            if m.header.sequence_number == seq {
                let multi = m.header.flags & NLM_F_MULTIPART != 0;
                match m.payload {
                    NetlinkPayload::Done(_) => return Ok(got),
                    NetlinkPayload::Error(e) => {
                        return match e.code {
                            None => Ok(got),
                            Some(_) => Err(e.to_io()),
                        }
                    }
                    NetlinkPayload::InnerMessage(i) => {
                        got.push(i);
                        if !dump && !ack && !multi {
                            return Ok(got);
                        }
                    }
                    _ => {}
                }
            }
            if len == 0 {
                break;
            }
            off += align4(len);
        }
    }
}

/// A connected rtnetlink socket for requests, with a receive timeout.
pub(crate) fn request_socket(timeout: Duration) -> std::io::Result<Socket> {
    let mut req = Socket::new(NETLINK_ROUTE)?;
    req.bind_auto()?;
    req.connect(&SocketAddr::new(0, 0))?;
    set_rcv_timeout(&req, timeout)?;
    Ok(req)
}

pub(crate) fn align4(n: usize) -> usize {
    (n + 3) & !3
}

fn set_rcv_timeout(s: &Socket, d: Duration) -> std::io::Result<()> {
    let tv = libc::timeval {
        tv_sec: d.as_secs() as libc::time_t,
        tv_usec: d.subsec_micros() as libc::suseconds_t,
    };
    // SAFETY: setsockopt on a socket we own, with a pointer to a live timeval and its size.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            &tv as *const libc::timeval as *const libc::c_void,
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
