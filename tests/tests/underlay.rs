//! End-to-end: a routed underlay. The chassis sit in different IP subnets joined by a router
//! namespace (xtask/src/testbed_routed.rs), so the next hop toward a remote chassis is the
//! router: the agents must take it from the kernel's FIB and neighbour table, resolve it
//! without waiting for it, and keep NB changes fast even when a remote chassis never answers.

use anyhow::{Context, Result};
use geneflow_tests::*;
use std::process::Command;
use std::time::{Duration, Instant};
use xtask::testbed_routed::{routed_chassis_ip, router_ip};

/// ch1 in 198.18.1.0/24 hosting vm1 (key 1), ch2 in 198.18.2.0/24 hosting vm3 (key 3), on ls1;
/// agents not started yet.
fn routed(tag: &str) -> Result<Testbed> {
    require_root();
    let mut tb = Testbed::new(tag)?;
    tb.add_routed_chassis("ch1", 1)?;
    tb.add_routed_chassis("ch2", 2)?;
    tb.nbctl(&["ls-add", "ls1", "--key", &LS1_KEY.to_string()])?;
    tb.add_vm("vm1", "ch1", "ls1", 1)?;
    tb.add_vm("vm3", "ch2", "ls1", 3)?;
    Ok(tb)
}

/// `ip neigh show` of a chassis's uplink, for assertions and failure reports.
fn neigh(tb: &Testbed, chassis: &str) -> Result<String> {
    let ns = &tb.chassis[tb.chassis_index(chassis)?].ns;
    run(Command::new("ip").args(["-n", ns, "-d", "neigh", "show", "dev", "ul"]))
}

fn drops(tb: &Testbed, chassis: &str) -> Result<Vec<String>> {
    let s = tb.stats(chassis)?;
    let mut out = Vec::new();
    for p in s["ports"].as_array().context("no ports")? {
        for (k, v) in p["counters"].as_object().context("no counters")? {
            if k.starts_with("drop_") && v.as_u64() != Some(0) {
                out.push(format!("{chassis} {}: {k} = {v}", p["iface"]));
            }
        }
    }
    Ok(out)
}

#[test]
fn routed_underlay_pings_and_streams_in_the_fast_path() -> Result<()> {
    let mut tb = routed("r1")?;
    // Nothing has resolved the routers yet: the agents must do it themselves.
    for c in ["ch1", "ch2"] {
        assert!(
            neigh(&tb, c)?.trim().is_empty(),
            "{c} already has neighbours: {}",
            neigh(&tb, c)?
        );
    }
    tb.start_agents()?;
    let diag = |tb: &Testbed| -> String {
        format!(
            "ch1 neigh: {}\nch2 neigh: {}\nch1 stats: {}\nch1 log:\n{}",
            neigh(tb, "ch1").unwrap_or_default(),
            neigh(tb, "ch2").unwrap_or_default(),
            tb.stats("ch1").map(|s| s.to_string()).unwrap_or_default(),
            tb.agent_log("ch1")
        )
    };
    let (ip1, ip3) = (tb.vm("vm1")?.ip.clone(), tb.vm("vm3")?.ip.clone());
    tb.ping("vm1", &ip3, 5).with_context(|| diag(&tb))?;
    tb.ping("vm3", &ip1, 5).with_context(|| diag(&tb))?;
    // The next hop is the router, made a managed entry (the kernel keeps it resolved although
    // the fast path's traffic bypasses its neighbour code).
    for (c, s) in [("ch1", 1), ("ch2", 2)] {
        let n = neigh(&tb, c)?;
        let line = n
            .lines()
            .find(|l| l.starts_with(&format!("{} ", router_ip(s))))
            .with_context(|| format!("{c}: no neighbour entry for the router: {n}"))?;
        assert!(line.contains("lladdr"), "{c}: router unresolved: {line}");
        assert!(
            line.contains("managed"),
            "{c}: router entry not managed: {line}"
        );
        // The remote chassis itself is not a neighbour: it is in another subnet.
        let other = routed_chassis_ip(3 - s);
        assert!(
            !n.contains(&format!("{other} ")),
            "{c} has a neighbour entry for the remote chassis {other}: {n}"
        );
    }
    let hits0 = tb.counter("ch1", "vp-vm1", "fastpath_hit")?;
    let dec0 = tb.counter("ch2", "ul", "fastpath_hit")?;
    let got = tb.udp_stream("vm1", "vm3", 6001, 10_000, 50_000)?;
    assert_eq!(
        got,
        10_000,
        "lost {} datagrams; {}",
        10_000 - got,
        diag(&tb)
    );
    let hits = tb.counter("ch1", "vp-vm1", "fastpath_hit")? - hits0;
    assert!(
        hits >= 9_900,
        "only {hits} of 10000 datagrams took the XDP fast path; {}",
        diag(&tb)
    );
    let dec = tb.counter("ch2", "ul", "fastpath_hit")? - dec0;
    assert!(dec >= 9_900, "ch2 decapsulated only {dec} in XDP");
    for c in ["ch1", "ch2"] {
        assert_eq!(
            tb.counter(c, "ul", "drop_no_neighbour")?
                + if c == "ch1" {
                    tb.counter(c, "vp-vm1", "drop_no_neighbour")?
                } else {
                    0
                },
            0,
            "{c} dropped for want of a neighbour; {}",
            diag(&tb)
        );
        let d = drops(&tb, c)?;
        assert!(d.is_empty(), "{d:?}");
    }
    Ok(())
}

/// The `apply_us` of the last "pipeline applied" line of an agent log.
fn last_apply_us(log: &str) -> Option<u64> {
    log.lines()
        .rev()
        .find(|l| l.contains("pipeline applied"))?
        .split_whitespace()
        .find_map(|w| w.strip_prefix("apply_us="))?
        .parse()
        .ok()
}

/// Waits until `chassis` has applied no new pipeline for `quiet`.
fn settle(tb: &Testbed, chassis: &str, quiet: Duration) -> Result<u64> {
    let mut n = pipelines_applied(tb, chassis)?;
    let mut since = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(10);
    while since.elapsed() < quiet && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        let m = pipelines_applied(tb, chassis)?;
        if m != n {
            n = m;
            since = Instant::now();
        }
    }
    Ok(n)
}

/// An NB change must reach the fast path in a few ms even when a remote chassis of the NB
/// never answers ARP: the agent resolves next hops in the background and never waits for them.
/// (This needs the forwarder's `apply` to no longer wait up to 200 ms for unresolved
/// neighbours; with that wait every apply here takes >= 200 ms.)
#[test]
fn nb_changes_apply_fast_with_a_silent_remote_chassis() -> Result<()> {
    const LIMIT_MS: u128 = 150;
    let mut tb = routed("r2")?;
    // "ghost" is a chassis in ch1's own subnet whose address nobody holds: ch1's kernel can
    // never resolve it. It hosts a port on ls1, so it is a remote chassis of ch1's pipeline.
    let ghost_ip = "198.18.1.99";
    tb.nbctl(&["chassis-add", "ghost", ghost_ip])?;
    tb.nbctl(&[
        "lsp-add",
        "ls1",
        "vmg",
        "0a:00:00:00:00:63",
        "10.0.0.99",
        "--key",
        "99",
    ])?;
    tb.nbctl(&["lsp-bind", "vmg", "ghost", "vmg-if"])?;
    tb.start_agents()?;
    tb.ping("vm1", &tb.vm("vm3")?.ip.clone(), 2)?;
    let mut e2e = Vec::new();
    let mut applies = Vec::new();
    for i in 0..3u16 {
        let key = 40 + i;
        let name = format!("vmn{i}");
        let mac = format!("0a:00:00:00:00:{key:02x}");
        let ip = format!("10.0.0.{key}");
        // A port added on ch2: ch1 learns a new remote location on ls1.
        tb.nbctl(&[
            "lsp-add",
            "ls1",
            &name,
            &mac,
            &ip,
            "--key",
            &key.to_string(),
        ])?;
        let before = settle(&tb, "ch1", Duration::from_millis(400))?;
        let t0 = Instant::now();
        tb.nbctl(&["lsp-bind", &name, "ch2", &format!("vp-{name}")])?;
        within(Duration::from_secs(3), || {
            Ok(pipelines_applied(&tb, "ch1")? > before)
        })?
        .with_context(|| {
            format!(
                "ch1 never applied the change; log:\n{}",
                tb.agent_log("ch1")
            )
        })?;
        e2e.push(t0.elapsed().as_millis());
        let log = tb.agent_log("ch1");
        applies.push(last_apply_us(&log).context("no pipeline applied line")?);
    }
    // The ghost stayed unresolved all along (the condition this test is about).
    let n = neigh(&tb, "ch1")?;
    assert!(
        n.lines()
            .filter(|l| l.starts_with(&format!("{ghost_ip} ")))
            .all(|l| !l.contains("lladdr")),
        "the ghost chassis resolved: {n}"
    );
    eprintln!("NB write -> applied on ch1 (ms): {e2e:?}; agent apply_us: {applies:?}");
    for us in &applies {
        assert!(
            (*us as u128) < LIMIT_MS * 1000,
            "an apply took {us} us (limit {LIMIT_MS} ms): the forwarder still waits for the silent chassis's neighbour? all: {applies:?}"
        );
    }
    e2e.sort();
    assert!(
        e2e[1] < LIMIT_MS,
        "NB write -> applied took {e2e:?} ms (median limit {LIMIT_MS} ms)"
    );
    // Traffic to the reachable chassis is unaffected. (Floods to the ghost wait up to a second
    // for its next hop, then count as drop_no_neighbour on ch1, rightly.)
    tb.ping("vm1", &tb.vm("vm3")?.ip.clone(), 2)?;
    Ok(())
}
