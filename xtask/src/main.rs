//! `cargo xtask`: setup (toolchain and test tools, idempotent), demo (two chassis, four VMs,
//! pings and a UDP stream through the overlay) and test (unit + end-to-end suites).

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::Command;
use xtask::testbed::{run, NbKind, Testbed};

mod demo;
use demo::demo;

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what building and testing need (apt packages, nightly rust-src, bpf-linker).
    Setup,
    /// Build, then run two chassis with two VMs each and show the overlay working.
    Demo,
    /// Control-plane benchmark: compile time at 10k ports / 100 switches, and NB write to
    /// fast path latency on each backend (file, etcd, redis).
    BenchNb {
        /// Fewer samples (for a smoke run).
        #[arg(long)]
        quick: bool,
        /// Instead: this many simulated chassis control planes against each backend.
        #[arg(long)]
        agents: Option<usize>,
        /// Tenants the simulated chassis are spread over (with --agents).
        #[arg(long, default_value_t = 100)]
        tenants: usize,
        /// With --agents: no run, the table and chart again from results/nb-scale-N.json.
        #[arg(long, requires = "agents")]
        render: bool,
    },
    /// Run each cargo-fuzz target (tests/fuzz) for a bounded time.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        secs: u64,
        /// Merge what the run finds into the corpus kept in the repo.
        #[arg(long)]
        grow: bool,
    },
    /// Datapath benchmark (pktgen scenarios against a plain-redirect baseline); writes
    /// results/bench.{md,json,svg}.
    Bench {
        /// One short run per scenario (under a minute; used by the test suite).
        #[arg(long)]
        quick: bool,
        /// Only these groups of scenarios (the generator ceiling and the baseline always run):
        /// encap (encap and decap), routed, sg (security group), fip, dhcp, e2e (end to end,
        /// slow path, flow setup), slow (the slow path on 1 and 2 threads), setup (flow setups
        /// per second on 1 and 2 threads), ovs, dpdk.
        #[arg(long, value_delimiter = ',', value_parser = ["encap", "routed", "sg", "fip", "dhcp", "e2e", "slow", "setup", "ovs", "dpdk"])]
        only: Vec<String>,
        /// Where the report goes.
        #[arg(long)]
        results: Option<PathBuf>,
    },
    /// Build, then run the unit tests and the end-to-end tests (root).
    Test {
        /// Extra arguments for the end-to-end test harness (e.g. a test name filter).
        args: Vec<String>,
    },
}

const APT: &[&str] = &[
    "llvm-22-dev",
    "libelf-dev",
    "clang",
    "m4",
    "ethtool",
    "iproute2",
    "iputils-ping",
    "tcpdump",
    "tshark",
    "python3-scapy",
    "bpftool",
    "protobuf-compiler",
    "udhcpc",
    "isc-dhcp-client",
    "etcd-server",
    "etcd-client",
    "redis-server",
    // redis-cli: the Redis Cluster tests create their cluster with `--cluster create`.
    "redis-tools",
    // DPDK 22.11 for the poll-mode backend (feature `dpdk` of geneflow-datapath; bindgen
    // reads its headers with the clang above).
    "libdpdk-dev",
    "iperf3",
    // The independent Geneve peer of the interop test and the OVS baselines of the bench.
    "openvswitch-switch",
    // OVS-DPDK, the peer of the bench's DPDK scenarios (its own binary, ovs-vswitchd-dpdk).
    "openvswitch-switch-dpdk",
    // Keeps the OVS chassis's own stack off its system ports (netdev ingress hook).
    "nftables",
];

/// The DPDK backend, built by the project's own commands (setup installs DPDK); a plain
/// `cargo build` leaves it out.
const DPDK_FEATURE: &str = "geneflow-datapath/dpdk";

fn main() {
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Setup => setup(),
        Cmd::Demo => setup().and_then(|_| build()).and_then(|_| demo()),
        Cmd::Test { args } => setup().and_then(|_| build()).and_then(|_| test(&args)),
        Cmd::BenchNb {
            agents: Some(n),
            render: true,
            ..
        } => render_scale(n),
        Cmd::BenchNb {
            quick,
            agents: Some(n),
            tenants,
            ..
        } => setup().and_then(|_| bench_scale(n, tenants, if quick { 10 } else { 30 })),
        Cmd::BenchNb { quick, .. } => setup().and_then(|_| bench_nb(quick)),
        Cmd::Fuzz { secs, grow } => setup().and_then(|_| xtask::fuzz::fuzz(&root(), secs, grow)),
        Cmd::Bench {
            quick,
            only,
            results,
        } => setup().and_then(|_| bench(quick, only, results)),
    };
    if let Err(e) = r {
        eprintln!("xtask: error: {e:#}");
        std::process::exit(1);
    }
}

pub(crate) fn step(msg: &str) {
    eprintln!("==> {msg}");
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .unwrap_or_default()
}

pub(crate) fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"))
}

fn check_root() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("must run as root (XDP, AF_XDP and network namespaces need it)");
    }
    Ok(())
}

fn have(prog: &str, arg: &str) -> bool {
    Command::new(prog)
        .arg(arg)
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// `cargo <sub> --version` works (an installed cargo subcommand).
fn have_cargo(sub: &str) -> bool {
    Command::new("cargo")
        .args([sub, "--version"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn setup() -> Result<()> {
    check_root()?;
    let missing: Vec<&str> = APT
        .iter()
        .copied()
        .filter(|p| {
            Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", p])
                .output()
                .map(|o| !String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
                .unwrap_or(true)
        })
        .collect();
    if missing.is_empty() {
        step("apt packages: all present");
    } else {
        step(&format!("apt: installing {}", missing.join(" ")));
        run(Command::new("apt-get").arg("update").arg("-q")).context("apt-get update failed")?;
        run(Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing))
        .context("apt-get install failed")?;
    }
    keep_plain_ovs_vswitchd()?;
    let toolchains = run(Command::new("rustup").args(["toolchain", "list"]))
        .context("rustup is needed (the eBPF program builds with nightly)")?;
    if !toolchains.lines().any(|l| l.starts_with("nightly")) {
        step("rustup: installing nightly (minimal) with rust-src");
        run(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
            "--component",
            "rust-src",
        ]))?;
    }
    let comps = run(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))?;
    if comps.lines().any(|l| l.starts_with("rust-src")) {
        step("rustup: nightly rust-src present");
    } else {
        step("rustup: adding rust-src to nightly");
        run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }
    if have_cargo("fuzz") {
        step("cargo-fuzz present");
    } else {
        step("cargo install cargo-fuzz, takes a minute once");
        let st = Command::new("cargo")
            .args(["install", "cargo-fuzz", "--locked"])
            .status()?;
        if !st.success() {
            bail!("cargo install cargo-fuzz failed");
        }
    }
    if have("bpf-linker", "--version") {
        step("bpf-linker present");
    } else {
        step("cargo install bpf-linker (LLVM 22), takes a few minutes once");
        let st = Command::new("cargo")
            .env("LLVM_PREFIX", "/usr/lib/llvm-22")
            .args([
                "install",
                "bpf-linker",
                "--locked",
                "--no-default-features",
                "--features",
                "llvm-22",
            ])
            .status()?;
        if !st.success() {
            bail!("cargo install bpf-linker failed");
        }
    }
    Ok(())
}

/// The plain ovs-vswitchd that the `ovs-vswitchd` alternative must point to.
const PLAIN_OVS_VSWITCHD: &str = "/usr/lib/openvswitch-switch/ovs-vswitchd";

/// openvswitch-switch-dpdk registers its build as an alternative for `ovs-vswitchd` (lower
/// priority, so auto mode keeps the plain one, but an earlier manual choice or a different
/// package version could leave the DPDK build selected). The interop tests and the OVS
/// scenarios of the bench run `ovs-vswitchd` from PATH as the plain userspace peer: the DPDK
/// build there would start an EAL (hugepages, PCI scan) in every one of them. The bench's
/// OVS-DPDK chassis run the DPDK binary by its own path (testbed_ovs_dpdk.rs).
fn keep_plain_ovs_vswitchd() -> Result<()> {
    let q = run(Command::new("update-alternatives").args(["--query", "ovs-vswitchd"]))
        .unwrap_or_default();
    let value = q
        .lines()
        .find_map(|l| l.strip_prefix("Value: "))
        .map(str::trim);
    match value {
        Some(PLAIN_OVS_VSWITCHD) | None => {}
        Some(other) => {
            step(&format!(
                "ovs-vswitchd alternative was {other}: setting it back to {PLAIN_OVS_VSWITCHD}"
            ));
            run(Command::new("update-alternatives").args([
                "--set",
                "ovs-vswitchd",
                PLAIN_OVS_VSWITCHD,
            ]))?;
        }
    }
    Ok(())
}

fn build() -> Result<()> {
    step("cargo build --workspace --bins --features geneflow-datapath/dpdk (the XDP program is built by datapath/build.rs)");
    let st = Command::new("cargo")
        .current_dir(root())
        .args(["build", "--workspace", "--bins", "--features", DPDK_FEATURE])
        .status()?;
    if !st.success() {
        bail!("cargo build failed");
    }
    Ok(())
}

fn test(args: &[String]) -> Result<()> {
    step("unit tests (no root, no kernel needed)");
    let st = Command::new("cargo")
        .current_dir(root())
        .args(["test", "--workspace", "--exclude", "geneflow-tests"])
        .args(["--features", DPDK_FEATURE])
        .status()?;
    if !st.success() {
        bail!("unit tests failed");
    }
    step("end-to-end tests over network namespaces (one at a time)");
    let st = Command::new("cargo")
        .current_dir(root())
        .env("GENEFLOW_BIN_DIR", target_dir().join("debug"))
        .args(["test", "-p", "geneflow-tests", "--", "--test-threads=1"])
        .args(args)
        .status()?;
    if !st.success() {
        bail!("end-to-end tests failed");
    }
    step("fuzz: each target for 60 s (corpus in tests/fuzz/corpus)");
    xtask::fuzz::fuzz(&root(), 60, false)?;
    step("bench --quick: every scenario must produce a figure (no assertion on speed)");
    std::env::set_var("GENEFLOW_BIN_DIR", target_dir().join("debug"));
    let dir = std::env::temp_dir().join(format!("gf-bench-quick-{}", std::process::id()));
    xtask::bench::bench(&xtask::bench::Opts {
        quick: true,
        only: vec![],
        results: dir.clone(),
    })?;
    xtask::bench::check_complete(&dir)?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

fn bench_scale(agents: usize, tenants: usize, writes: usize) -> Result<()> {
    build_release()?;
    std::env::set_var("GENEFLOW_BIN_DIR", target_dir().join("release"));
    let results = xtask::bench::scale::scale(agents, tenants, writes)?;
    let dir = root().join("results");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(format!("nb-scale-{agents}.json"));
    std::fs::write(&path, serde_json::to_vec_pretty(&results)?)?;
    write_scale(agents, &results)
}

fn render_scale(agents: usize) -> Result<()> {
    let path = root().join(format!("results/nb-scale-{agents}.json"));
    let text = std::fs::read_to_string(&path).with_context(|| path.display().to_string())?;
    let results: Vec<serde_json::Value> = serde_json::from_str(&text)?;
    write_scale(agents, &results)
}

fn write_scale(agents: usize, results: &[serde_json::Value]) -> Result<()> {
    println!("{}", xtask::bench::scale::table(results));
    let dir = root().join("results");
    let path = dir.join(format!("nb-scale-{agents}.json"));
    let chart = dir.join(format!("nb-scale-{agents}.svg"));
    std::fs::write(&chart, xtask::bench::scale::svg(results))?;
    step(&format!(
        "raw results in {}, chart in {}",
        path.display(),
        chart.display()
    ));
    Ok(())
}

fn bench_nb(quick: bool) -> Result<()> {
    build_release()?;
    let bins = target_dir().join("release");
    std::env::set_var("GENEFLOW_BIN_DIR", &bins);
    let bench = bins.join("gf-nb-bench").display().to_string();
    let runs = if quick { "5" } else { "25" };
    step("compile: 10k ports on 100 switches (validate, full compile, incremental compile)");
    let out = run(Command::new(&bench).args(["compile", "--runs", runs]))?;
    let compile: serde_json::Value = serde_json::from_str(out.trim())?;
    let mut latency = Vec::new();
    for kind in [NbKind::File, NbKind::Etcd(1), NbKind::Redis] {
        step(&format!("NB write -> fast path latency on {kind:?}"));
        let mut tb = Testbed::with_nb("bnb", kind)?;
        tb.add_chassis("ch1")?;
        tb.nbctl(&["chassis-add", "chr", "198.18.0.99"])?;
        tb.nbctl(&["ls-add", "ls1", "--key", "1000"])?;
        tb.add_vm("vm1", "ch1", "ls1", 1)?;
        // A router on ls1, so that route changes concern this chassis.
        tb.add_ls1_router("r1", 1010)?;
        tb.start_agents()?;
        let ctl = tb.chassis[0].socket.display().to_string();
        let samples = if quick { "10" } else { "60" };
        for change in ["port", "route"] {
            let args = [
                "latency",
                "--nb",
                &tb.nb,
                "--ctl",
                &ctl,
                "--switch",
                "ls1",
                "--remote",
                "chr",
                "--samples",
                samples,
                "--change",
                change,
                "--router",
                "r1",
                "--nexthop",
                "10.0.0.50",
            ];
            let out = match &tb.db_ns {
                Some(ns) => run(Command::new("ip")
                    .args(["netns", "exec", ns, &bench])
                    .args(args))?,
                None => run(Command::new(&bench).args(args))?,
            };
            latency.push(serde_json::from_str::<serde_json::Value>(out.trim())?);
        }
    }
    step("memory: agent RSS and BPF maps, empty, 10k ports, 100k megaflows");
    let memory = xtask::bench::memory::memory()?;
    println!("\n| measurement | value |\n|---|---|");
    println!(
        "| validate 10k ports / 100 switches, p50 | {:.2} ms |",
        compile["validate_ms_p50"].as_f64().unwrap_or(0.0)
    );
    println!(
        "| full compile, p50 (baseline) | {:.2} ms |",
        compile["full_compile_ms_p50"].as_f64().unwrap_or(0.0)
    );
    println!(
        "| incremental compile (1 port changed), p50 | {:.2} ms ({:.2}x the full compile) |",
        compile["incremental_compile_ms_p50"]
            .as_f64()
            .unwrap_or(0.0),
        compile["incremental_over_full"].as_f64().unwrap_or(0.0)
    );
    println!("\n| backend | change | write p50 | NB write -> fast path p50 | p99 |\n|---|---|---|---|---|");
    for l in &latency {
        println!(
            "| {} | {} | {:.2} ms | {:.2} ms | {:.2} ms |",
            l["backend"].as_str().unwrap_or("?"),
            l["change"].as_str().unwrap_or("?"),
            l["write_ms_p50"].as_f64().unwrap_or(0.0),
            l["to_fastpath_ms_p50"].as_f64().unwrap_or(0.0),
            l["to_fastpath_ms_p99"].as_f64().unwrap_or(0.0)
        );
    }
    println!("\n| chassis state | megaflows | agent RSS | of which AF_XDP UMEMs | BPF maps | of which megaflows |\n|---|---|---|---|---|---|");
    for p in memory.as_array().into_iter().flatten() {
        println!(
            "| {} | {} | {:.1} MB | {:.1} MB | {:.1} MB | {:.1} MB |",
            p["what"].as_str().unwrap_or("?"),
            p["megaflows"],
            p["agent_rss_kb"].as_f64().unwrap_or(0.0) / 1024.0,
            p["umem_rss_kb"].as_f64().unwrap_or(0.0) / 1024.0,
            p["bpf_bytes"].as_f64().unwrap_or(0.0) / 1e6,
            p["flows_bytes"].as_f64().unwrap_or(0.0) / 1e6
        );
    }
    let dir = root().join("results");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("nb-bench.json");
    std::fs::write(
        &path,
        serde_json::to_vec_pretty(
            &serde_json::json!({ "compile": compile, "latency": latency, "memory": memory }),
        )?,
    )?;
    step(&format!("raw results in {}", path.display()));
    Ok(())
}

fn bench(quick: bool, only: Vec<String>, results: Option<PathBuf>) -> Result<()> {
    // GENEFLOW_BIN_DIR set by the caller benches the binaries there (e.g. an older commit's
    // geneflowd beside this pktgen) with the same scenarios, and builds nothing.
    if std::env::var_os("GENEFLOW_BIN_DIR").is_none() {
        build_release()?;
        std::env::set_var("GENEFLOW_BIN_DIR", target_dir().join("release"));
    }
    xtask::bench::bench(&xtask::bench::Opts {
        quick,
        only,
        results: results.unwrap_or_else(|| xtask::bench::results_dir(&root())),
    })
}

fn build_release() -> Result<()> {
    step("cargo build --release --workspace --bins --features geneflow-datapath/dpdk");
    let st = Command::new("cargo")
        .current_dir(root())
        .args(["build", "--release", "--workspace", "--bins"])
        .args(["--features", DPDK_FEATURE])
        .status()?;
    if !st.success() {
        bail!("cargo build --release failed");
    }
    Ok(())
}
