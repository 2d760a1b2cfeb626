//! gf-udp: a bounded UDP stream. `send` emits N sequence-numbered datagrams at a fixed rate;
//! `recv` counts distinct sequence numbers until it has N or the stream goes idle, then prints
//! one JSON line. Used inside VM namespaces by the tests and the demo.

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use std::collections::HashSet;
use std::io::Write;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

#[derive(Parser)]
#[command(
    name = "gf-udp",
    about = "bounded UDP stream sender / counting receiver"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    Send {
        #[arg(long)]
        dst: SocketAddr,
        #[arg(long, default_value_t = 10000)]
        count: u64,
        /// Packets per second.
        #[arg(long, default_value_t = 20000)]
        rate: u64,
        /// UDP payload bytes (>= 8).
        #[arg(long, default_value_t = 64)]
        size: usize,
        /// Source port (0 = any).
        #[arg(long, default_value_t = 0)]
        sport: u16,
    },
    Recv {
        #[arg(long)]
        port: u16,
        #[arg(long, default_value_t = 10000)]
        count: u64,
        /// Give up after this long without a packet, counted from the start too (seconds).
        #[arg(long, default_value_t = 3.0)]
        idle: f64,
        /// Give up after this long in total (seconds).
        #[arg(long, default_value_t = 60.0)]
        timeout: f64,
    },
}

fn main() {
    if let Err(e) = run(Cli::parse()) {
        eprintln!("gf-udp: error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Send {
            dst,
            count,
            rate,
            size,
            sport,
        } => {
            let s = UdpSocket::bind(("0.0.0.0", sport)).context("bind")?;
            let mut buf = vec![0u8; size.max(8)];
            let start = Instant::now();
            let mut sent = 0u64;
            while sent < count {
                // Pace in small bursts: precise enough, and no syscall storm of sleeps.
                let due = ((start.elapsed().as_secs_f64() * rate as f64) as u64 + 1).min(count);
                let mut stuck_since: Option<Instant> = None;
                while sent < due {
                    buf[..8].copy_from_slice(&sent.to_be_bytes());
                    match s.send_to(&buf, dst) {
                        Ok(_) => {
                            sent += 1;
                            stuck_since = None;
                        }
                        // ENOBUFS/EAGAIN from a full qdisc: retry, never skip a sequence; but
                        // not forever, and not on errors that will not go away (the interface
                        // or its namespace is gone).
                        Err(e) => {
                            let transient = e.kind() == std::io::ErrorKind::WouldBlock
                                || e.raw_os_error() == Some(libc::ENOBUFS);
                            let t = *stuck_since.get_or_insert_with(Instant::now);
                            if !transient || t.elapsed() > Duration::from_secs(5) {
                                bail!("send to {dst} failed after {sent} datagrams: {e}");
                            }
                            std::thread::sleep(Duration::from_micros(50));
                        }
                    }
                }
                std::thread::sleep(Duration::from_micros(200));
            }
            println!(
                "{{\"sent\":{sent},\"secs\":{:.3}}}",
                start.elapsed().as_secs_f64()
            );
        }
        Cmd::Recv {
            port,
            count,
            idle,
            timeout,
        } => {
            let s = UdpSocket::bind(("0.0.0.0", port)).context("bind")?;
            let size: libc::c_int = 16 << 20;
            // SAFETY: setsockopt on our own socket with a correctly sized int.
            unsafe {
                libc::setsockopt(
                    s.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_RCVBUFFORCE,
                    &size as *const _ as *const libc::c_void,
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                );
            }
            s.set_read_timeout(Some(Duration::from_millis(100)))?;
            println!("ready");
            std::io::stdout().flush()?;
            let mut seen = HashSet::with_capacity(count as usize);
            let mut total = 0u64;
            let mut buf = [0u8; 65536];
            let start = Instant::now();
            let mut last = Instant::now();
            while (seen.len() as u64) < count
                && start.elapsed().as_secs_f64() < timeout
                && last.elapsed().as_secs_f64() < idle
            {
                if let Ok(n) = s.recv(&mut buf) {
                    if n >= 8 {
                        total += 1;
                        last = Instant::now();
                        seen.insert(u64::from_be_bytes(buf[..8].try_into().expect("8 bytes")));
                    }
                }
            }
            println!("{{\"received\":{total},\"unique\":{}}}", seen.len());
        }
    }
    Ok(())
}
