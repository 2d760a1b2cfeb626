//! gf-zmq-forge: a hostile or faulty ZeroMQ publisher (or writer) for the end-to-end tests.
//! As a publisher it behaves like `geneflow-publisher` (heartbeats, a `Sync` for every
//! subscription) until the file `--go` appears, then plays its script once:
//!
//! - `gap`: two changes of `--topic` numbered with a hole between them;
//! - `tail`: a `Sync` of `--topic` announcing a change that never came (what a subscriber
//!   that fell behind its queue sees when the last messages were dropped);
//! - `garbage`: malformed messages of every kind on `--topic`;
//! - `push-garbage`: malformed writes pushed to a real publisher's intake (`--port`).
//!
//! `--script` may list several, comma-separated: each waits for the file `--go`, plays, prints
//! `sent <script>` and removes the file. Then it idles until killed.

use anyhow::Result;
use clap::Parser;
use geneflow_control::nb::zmq::wire::{encode_changes, Header, Kind, HEARTBEAT_TOPIC};
use geneflow_control::nb::Event;
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(Parser)]
struct Cli {
    #[arg(long)]
    listen: String,
    #[arg(long)]
    port: u16,
    #[arg(long)]
    topic: String,
    #[arg(long)]
    go: PathBuf,
    /// gap, tail, garbage or push-garbage; a publisher's scripts may be comma-separated.
    #[arg(long)]
    script: String,
}

const EPOCH: u64 = 0x0f0f_0f0f_0f0f_0f0f;

fn header(kind: Kind, seq: u64) -> Vec<u8> {
    Header {
        kind,
        epoch: EPOCH,
        seq,
    }
    .encode()
    .to_vec()
}

fn put(k: &str, v: Vec<u8>) -> Event {
    Event::Put(k.to_string(), v)
}

/// Every malformed message an agent must skip (each named in its log).
fn garbage(t: &str) -> Vec<Vec<Vec<u8>>> {
    let tb = t.as_bytes().to_vec();
    let own = format!("{t}ports/vm3");
    // vm3's deletion in the same message as a key of another tenant: refused whole.
    let foreign = encode_changes(&[
        Event::Delete(own.clone()),
        put("/gf/t/other/ports/x", b"{}".to_vec()),
    ]);
    let oversized = encode_changes(&[put(&own, vec![b' '; 2 << 20])]);
    let mut truncated = encode_changes(&[Event::Delete(own)]);
    truncated.truncate(truncated.len() - 3);
    let mut bad_magic = header(Kind::Changes, 1);
    bad_magic[0] = 0;
    let mut bad_kind = header(Kind::Changes, 1);
    bad_kind[1] = 9;
    vec![
        vec![tb.clone()],
        vec![tb.clone(), vec![1; 17]],
        vec![tb.clone(), bad_magic, encode_changes(&[])],
        vec![tb.clone(), bad_kind],
        vec![tb.clone(), header(Kind::Changes, 1), foreign],
        vec![tb.clone(), header(Kind::Changes, 1), oversized],
        vec![tb.clone(), header(Kind::Changes, 1), truncated],
        vec![tb.clone(), header(Kind::Heartbeat, 0)],
        vec![tb.clone(), header(Kind::Sync, 0), vec![1, 2, 3]],
        vec![format!("{t}ports/").into_bytes(), header(Kind::Changes, 1)],
        vec![
            HEARTBEAT_TOPIC.as_bytes().to_vec(),
            header(Kind::Changes, 1),
            encode_changes(&[]),
        ],
    ]
}

/// Malformed writes for a publisher's intake.
fn push_garbage(t: &str) -> Vec<Vec<Vec<u8>>> {
    let tb = t.as_bytes().to_vec();
    vec![
        vec![tb.clone()],
        vec![b"/gf/".to_vec(), encode_changes(&[])],
        vec![HEARTBEAT_TOPIC.as_bytes().to_vec(), encode_changes(&[])],
        vec![tb.clone(), vec![0, 0, 0, 9, 1]],
        vec![
            tb,
            encode_changes(&[Event::Delete("/gf/t/other/ports/x".into())]),
        ],
    ]
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let ctx = zmq::Context::new();
    if cli.script == "push-garbage" {
        let s = ctx.socket(zmq::PUSH)?;
        s.connect(&format!("tcp://{}:{}", cli.listen, cli.port + 1))?;
        while !cli.go.exists() {
            std::thread::sleep(Duration::from_millis(20));
        }
        for m in push_garbage(&cli.topic) {
            s.send_multipart(m, 0)?;
        }
        println!("sent {}", cli.script);
        loop {
            std::thread::sleep(Duration::from_secs(1));
        }
    }
    let out = ctx.socket(zmq::XPUB)?;
    out.set_xpub_verbose(true)?;
    out.bind(&format!("tcp://{}:{}", cli.listen, cli.port))?;
    let mut seqs: HashMap<Vec<u8>, u64> = HashMap::new();
    let mut scripts: std::collections::VecDeque<String> =
        cli.script.split(',').map(str::to_string).collect();
    let mut beat = Instant::now();
    loop {
        if beat.elapsed() >= Duration::from_millis(200) {
            out.send_multipart([HEARTBEAT_TOPIC.as_bytes(), &header(Kind::Heartbeat, 0)], 0)?;
            beat = Instant::now();
        }
        if out.poll(zmq::POLLIN, 50)? > 0 {
            let sub = out.recv_bytes(0)?;
            if let Some((&1, topic)) = sub.split_first() {
                if topic != HEARTBEAT_TOPIC.as_bytes() {
                    let seq = *seqs.get(topic).unwrap_or(&0);
                    out.send_multipart([topic, &header(Kind::Sync, seq)], 0)?;
                }
            }
        }
        if scripts.is_empty() || !cli.go.exists() {
            continue;
        }
        let script = scripts.pop_front().unwrap_or_default();
        let t = cli.topic.as_bytes().to_vec();
        let seq = seqs.entry(t.clone()).or_insert(0);
        let msgs = match script.as_str() {
            "gap" => {
                *seq += 3;
                vec![
                    vec![
                        t.clone(),
                        header(Kind::Changes, *seq - 2),
                        encode_changes(&[]),
                    ],
                    vec![t, header(Kind::Changes, *seq), encode_changes(&[])],
                ]
            }
            "tail" => {
                *seq += 1;
                vec![vec![t, header(Kind::Sync, *seq)]]
            }
            "garbage" => garbage(&cli.topic),
            other => anyhow::bail!("unknown script {other:?}"),
        };
        for m in msgs {
            out.send_multipart(m, 0)?;
        }
        println!("sent {script}");
        std::fs::remove_file(&cli.go)?;
    }
}
