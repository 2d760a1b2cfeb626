//! geneflow-publisher: fans NB changes out to the agents over ZeroMQ (see
//! `geneflow_control::publisher`). Writers and agents find it through the NB URL:
//! `etcd://10.0.0.1:2379?publishers=10.0.0.5:6620,10.0.0.6:6620`. Run several for
//! redundancy: writers notify every one, agents listen to every one.

use anyhow::{Context, Result};
use clap::Parser;
use geneflow_control::publisher::{Config, Publisher};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "geneflow-publisher",
    version,
    about = "ZeroMQ publisher of NB changes: writers push to PORT+1, agents subscribe on PORT"
)]
struct Cli {
    /// Address to listen on.
    #[arg(long, default_value = "0.0.0.0")]
    listen: std::net::IpAddr,
    /// Agents subscribe on this port; writers push to the next one.
    #[arg(long, default_value_t = 6620, value_parser = clap::value_parser!(u16).range(1..65535))]
    port: u16,
    /// Heartbeat interval in milliseconds (agents count a publisher down after 2 s).
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u64).range(10..=1000))]
    heartbeat_ms: u64,
    /// Topics numbered at most; changes of further topics are dropped (and counted).
    #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1..))]
    max_topics: u64,
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let mut p = Publisher::bind(Config {
        listen: cli.listen.to_string(),
        port: cli.port,
        heartbeat: Duration::from_millis(cli.heartbeat_ms),
        max_topics: cli.max_topics as usize,
    })?;
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        ctrlc::set_handler(move || stop.store(true, Ordering::Relaxed))
            .context("installing the signal handler")?;
    }
    p.run(&stop)?;
    Ok(())
}
