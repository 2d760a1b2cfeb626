//! Hitless restart: the fast path is pinned on bpffs, outlives `geneflowd` (SIGKILL or SIGTERM)
//! and is adopted by the next one, which swaps its own program in atomically; `--cleanup` and
//! `--cleanup-only` tear it down.

use anyhow::{Context, Result};
use geneflow_tests::*;
use std::process::Command;
use std::time::{Duration, Instant};

const N: u64 = 200_000;

/// Counter `name` of interface `iface` in a `stats` answer.
fn tb_counter(stats: &serde_json::Value, iface: &str, name: &str) -> u64 {
    stats["ports"]
        .as_array()
        .and_then(|a| a.iter().find(|p| p["iface"] == iface))
        .and_then(|p| p["counters"][name].as_u64())
        .unwrap_or(0)
}

/// Waits (up to 2 s) until `iface` runs another XDP program than `old`; returns its id.
fn swapped_in(ns: &str, iface: &str, old: u64) -> Result<u64> {
    let mut now = None;
    within(Duration::from_secs(2), || {
        now = xdp_prog_id(ns, iface)?;
        Ok(now.is_some_and(|id| id != old))
    })?
    .with_context(|| format!("{iface} still runs program {old} (now {now:?})"))?;
    now.context("no XDP program")
}
const RATE: u64 = 20_000;

#[test]
fn sigkill_and_restart_during_a_stream_lose_no_packet() -> Result<()> {
    let mut tb = two_chassis("rk")?;
    let (vm1, vm3) = (tb.vm("vm1")?.clone(), tb.vm("vm3")?.clone());
    let (ns1, ns2) = (tb.chassis[0].ns.clone(), tb.chassis[1].ns.clone());
    // Establish the flows both ways (ARP, megaflows) before the stream.
    tb.ping("vm1", &vm3.ip, 2)?;
    let before = (
        xdp_prog_id(&ns1, &vm1.iface)?.context("no XDP on ch1's vm1 port")?,
        xdp_prog_id(&ns2, "ul")?.context("no XDP on ch2's uplink")?,
    );
    let rx = tb.udp_receiver("vm3", 6800, N, 3.0)?;
    let mut tx = tb.udp_sender("vm1", &vm3.ip, 6800, N, RATE)?;
    let t0 = Instant::now();
    let at = |s: f64| {
        let when = t0 + Duration::from_secs_f64(s);
        std::thread::sleep(when.saturating_duration_since(Instant::now()));
    };

    // Encapsulating side: kill ch1's agent mid-stream; its XDP program keeps forwarding.
    at(2.0);
    let counted = tb.stats("ch1")?;
    tb.kill_agent(0);
    at(2.5);
    assert_eq!(
        xdp_prog_id(&ns1, &vm1.iface)?,
        Some(before.0),
        "the fast path died with the agent"
    );
    tb.start_agent(0)?;
    // Once its pipeline is applied the new agent swaps its own program in, on every link.
    let swapped = swapped_in(&ns1, &vm1.iface, before.0)?;
    assert_eq!(
        xdp_prog_id(&ns1, "ul")?,
        Some(swapped),
        "uplink runs another program"
    );

    // No counter went backwards: the fast path's and the slow path's both outlive the process
    // (a total that dropped would read as a counter reset to Prometheus).
    let now = tb.stats("ch1")?;
    for p in counted["ports"].as_array().context("ports")? {
        let iface = p["iface"].as_str().unwrap_or("");
        for (name, v) in p["counters"].as_object().context("counters")? {
            let after = tb_counter(&now, iface, name);
            assert!(
                after >= v.as_u64().unwrap_or(0),
                "{iface} {name}: {v} before the restart, {after} after"
            );
        }
    }
    assert!(tb_counter(&now, &vm1.iface, "slowpath_rx") > 0);

    // Decapsulating side.
    at(5.0);
    tb.kill_agent(1);
    at(5.5);
    assert_eq!(xdp_prog_id(&ns2, "ul")?, Some(before.1));
    tb.start_agent(1)?;
    swapped_in(&ns2, "ul", before.1)?;

    let st = tx.wait()?;
    assert!(st.success(), "sender: {st}");
    let got = Testbed::udp_result(rx)?;
    assert_eq!(
        got,
        N,
        "lost {} of {N} datagrams across two restarts",
        N - got
    );

    // The restarted agents adopted the pinned state instead of starting cold.
    for ch in ["ch1", "ch2"] {
        let log = tb.agent_log(ch);
        assert!(
            log.contains("adopted the fast-path state of the previous process"),
            "{ch} did not adopt:\n{log}"
        );
    }
    // ch1's new agent still knows the megaflow it inherited and sees its hits.
    let flows = megaflows(&tb, "ch1")?;
    let f = megaflow_to(&flows, &vm3.mac)
        .with_context(|| format!("megaflow to vm3 lost: {flows:?}"))?;
    assert!(f["hits"].as_u64().unwrap_or(0) >= N / 2, "{f}");
    assert_eq!(f["stale"], false, "{f}");
    Ok(())
}

#[test]
fn sigterm_keeps_the_fast_path_and_cleanup_removes_it() -> Result<()> {
    let mut tb = two_chassis("rt")?;
    let (vm1, vm3) = (tb.vm("vm1")?.clone(), tb.vm("vm3")?.clone());
    let ns1 = tb.chassis[0].ns.clone();
    let pins = tb.pin_dir("ch1");
    tb.ping("vm1", &vm3.ip, 2)?;
    // SIGTERM: the agent is gone, established traffic still flows.
    tb.stop_agent(0);
    assert!(xdp_prog_id(&ns1, &vm1.iface)?.is_some());
    assert!(
        pins.join("links").read_dir()?.count() >= 3,
        "uplink + 2 VM links pinned"
    );
    assert_eq!(tb.udp_stream("vm1", "vm3", 6801, 1_000, 5_000)?, 1_000);
    let torn_down = || -> Result<()> {
        assert_eq!(xdp_prog_id(&ns1, &vm1.iface)?, None);
        assert_eq!(xdp_prog_id(&ns1, "ul")?, None);
        assert!(!pins.exists(), "{} left behind", pins.display());
        Ok(())
    };
    // --cleanup-only on the stopped agent's pins tears the datapath down.
    run(Command::new("ip")
        .args(["netns", "exec", &ns1])
        .arg(tb.bin("geneflowd"))
        .args([
            "--chassis",
            "ch1",
            "--pin-dir",
            &pins.display().to_string(),
            "--cleanup-only",
        ]))?;
    torn_down()?;
    // A cold start works after that; with --cleanup, SIGTERM removes everything.
    tb.chassis[0].agent_args = vec!["--cleanup".into()];
    tb.start_agent(0)?;
    assert_eq!(tb.udp_stream("vm1", "vm3", 6802, 100, 5_000)?, 100);
    tb.stop_agent(0);
    torn_down()?;
    // A pin directory off bpffs is refused with one line naming it.
    let out = Command::new("ip")
        .args(["netns", "exec", &ns1])
        .arg(tb.bin("geneflowd"))
        .args([
            "--chassis",
            "ch1",
            "--uplink",
            "ul",
            "--pin-dir",
            "/tmp/not-bpffs/ch1",
        ])
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.trim().lines().count() == 1 && err.contains("pin_dir /tmp/not-bpffs/ch1"),
        "{err}"
    );
    Ok(())
}

#[test]
fn megaflows_of_a_datapath_changed_while_down_are_not_adopted() -> Result<()> {
    let mut tb = two_chassis("rc")?;
    let (vm1, vm3) = (tb.vm("vm1")?.clone(), tb.vm("vm3")?.clone());
    assert_eq!(tb.udp_stream("vm1", "vm3", 6810, 100, 5_000)?, 100);
    tb.kill_agent(0);
    // While ch1 has no agent, vm3 leaves ls1: the pinned megaflow to it is now wrong.
    tb.nbctl(&["lsp-del", "vm3"])?;
    tb.start_agent(0)?;
    let flows = megaflows(&tb, "ch1")?;
    assert!(
        megaflow_to(&flows, &vm3.mac).is_none(),
        "the stale megaflow to vm3 was adopted: {flows:?}"
    );
    // Frames to vm3 now end where the new pipeline says: no destination.
    let before = tb.counter("ch1", &vm1.iface, "drop_no_destination")?;
    tb.udp_send("vm1", &vm3.ip, 6811, 20, 1_000)?;
    // Polled: the last frames may still be on the slow path's ring when the sender exits.
    let after = counter_reaches(&tb, "ch1", &vm1.iface, "drop_no_destination", before + 20);
    assert_eq!(after - before, 20);
    assert!(
        tb.agent_log("ch1").contains("changed=[1000]"),
        "{}",
        tb.agent_log("ch1")
    );
    Ok(())
}

#[test]
fn restart_while_the_nb_is_down_keeps_established_flows() -> Result<()> {
    let mut tb = two_chassis_on("rn", NbKind::Redis)?;
    let (vm1, vm3) = (tb.vm("vm1")?.clone(), tb.vm("vm3")?.clone());
    let ns1 = tb.chassis[0].ns.clone();
    tb.ping("vm1", &vm3.ip, 2)?;
    let old = xdp_prog_id(&ns1, "ul")?.context("no XDP on ch1's uplink")?;
    const M: u64 = 40_000;
    let rx = tb.udp_receiver("vm3", 6820, M, 3.0)?;
    let mut tx = tb.udp_sender("vm1", &vm3.ip, 6820, M, 5_000)?;
    std::thread::sleep(Duration::from_secs(1));
    // The NB goes away, then ch1's agent dies and comes back without it: it holds the pinned
    // state, but the previous program keeps serving every interface until a pipeline exists.
    tb.kill_server(0);
    tb.kill_agent(0);
    tb.start_agent_uplink_only(0)?;
    std::thread::sleep(Duration::from_secs(3));
    assert!(!tb
        .agent_log("ch1")
        .contains("adopted the fast-path state of the previous"));
    assert_eq!(xdp_prog_id(&ns1, "ul")?, Some(old));
    assert_eq!(xdp_prog_id(&ns1, &vm1.iface)?, Some(old));
    tb.start_server(0)?;
    within(Duration::from_secs(10), || {
        Ok(tb
            .agent_log("ch1")
            .contains("adopted the fast-path state of the previous process"))
    })?
    .context("the agent did not finish adopting once the NB returned")?;
    swapped_in(&ns1, "ul", old)?;
    swapped_in(&ns1, &vm1.iface, old)?;
    assert!(tx.wait()?.success());
    let got = Testbed::udp_result(rx)?;
    assert_eq!(got, M, "lost {} of {M}", M - got);
    Ok(())
}

#[test]
fn an_upgrade_across_map_layouts_starts_fresh_maps_without_loss() -> Result<()> {
    let mut tb = two_chassis("ru")?;
    let (vm1, vm3) = (tb.vm("vm1")?.clone(), tb.vm("vm3")?.clone());
    let ns1 = tb.chassis[0].ns.clone();
    assert_eq!(tb.udp_stream("vm1", "vm3", 6830, 100, 5_000)?, 100);
    // A stream across the whole upgrade: the old program serves on its old maps until the new
    // agent has a pipeline, then the new one starts from empty maps and the slow path refills
    // them while forwarding.
    const M: u64 = 20_000;
    let rx = tb.udp_receiver("vm3", 6833, M, 3.0)?;
    let mut tx = tb.udp_sender("vm1", &vm3.ip, 6833, M, 5_000)?;
    std::thread::sleep(Duration::from_secs(1));
    tb.stop_agent(0);
    let old = xdp_prog_id(&ns1, &vm1.iface)?.context("no XDP")?;
    // What a build of another ABI version would have left: its maps under its own version.
    let pins = tb.pin_dir("ch1");
    let maps = std::fs::read_dir(&pins)?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("maps-v"))
        .context("no pinned maps")?;
    std::fs::rename(pins.join(&maps), pins.join("maps-v0"))?;
    tb.start_agent(0)?;
    assert!(
        !pins.join("maps-v0").exists(),
        "old-layout maps left behind"
    );
    assert!(pins.join(&maps).join("FLOWS").exists());
    swapped_in(&ns1, &vm1.iface, old)?;
    assert!(tb
        .agent_log("ch1")
        .contains("removed pinned maps of another ABI version"));
    assert!(tx.wait()?.success());
    let got = Testbed::udp_result(rx)?;
    assert_eq!(got, M, "lost {} of {M} across the upgrade", M - got);
    // Nothing adopted (fresh maps): the slow path refilled them.
    let s = tb.stats("ch1")?;
    assert!(s["megaflows"].as_u64().unwrap_or(0) >= 1, "{s}");
    // A pinned map of our version but another shape (a build that forgot to bump the version)
    // is not adopted either.
    tb.stop_agent(0);
    let config = pins.join(&maps).join("CONFIG");
    std::fs::remove_file(&config)?;
    run(Command::new("bpftool")
        .args(["map", "create"])
        .arg(&config)
        .args([
            "type", "array", "key", "4", "value", "16", "entries", "1", "name", "CONFIG",
        ]))?;
    tb.start_agent(0)?;
    assert!(tb
        .agent_log("ch1")
        .contains("pinned maps do not match this program's layout"));
    assert_eq!(tb.udp_stream("vm1", "vm3", 6832, 100, 5_000)?, 100);
    Ok(())
}
