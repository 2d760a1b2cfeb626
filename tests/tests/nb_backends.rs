//! End-to-end: the control plane on every NB backend (file, etcd, redis, a Redis Cluster) with
//! real servers started by the harness, etcd leader failover, NB outages, selective
//! distribution, bad records and periodic reconciliation (the Redis Cluster's failover is in
//! redis_cluster.rs).

use anyhow::{Context, Result};
use geneflow_tests::*;
use std::process::{Command, Stdio};
use std::time::Duration;

/// The overlay works on `kind`, and a port added or deleted in the NB starts or stops
/// carrying traffic within 1 s.
fn overlay_and_port_churn(tag: &str, kind: NbKind) -> Result<()> {
    let mut tb = two_chassis_on(tag, kind)?;
    for (a, b) in [("vm1", "vm3"), ("vm2", "vm4"), ("vm1", "vm2")] {
        tb.ping(a, &tb.vm(b)?.ip.clone(), 2)?;
    }
    let got = tb.udp_stream("vm1", "vm3", 6200, 5_000, 50_000)?;
    assert_eq!(got, 5_000, "{kind:?}: stream lost {}", 5_000 - got);
    // Add vm5 on ch2: the VM exists first, then its port appears in the NB.
    tb.add_vm_unbound("vm5", "ch2", 5)?;
    let ip5 = tb.vm("vm5")?.ip.clone();
    assert!(
        !reachable(&tb, "vm1", &ip5),
        "vm5 reachable before its port exists"
    );
    add_port_of_vm5(&tb)?;
    let took = within(Duration::from_secs(5), || Ok(reachable(&tb, "vm1", &ip5)))?
        .with_context(|| format!("{kind:?}: new port never carried traffic"))?;
    // Each probe waits up to 300 ms for its answer: the port was live before the probe that
    // succeeded started.
    assert!(
        took < Duration::from_millis(1300),
        "{kind:?}: new port took {took:?}"
    );
    tb.nbctl(&["lsp-del", "vm5"])?;
    let took = within(Duration::from_secs(5), || Ok(!reachable(&tb, "vm1", &ip5)))?
        .with_context(|| format!("{kind:?}: deleted port kept carrying traffic"))?;
    assert!(
        took < Duration::from_millis(1300),
        "{kind:?}: delete took {took:?}"
    );
    Ok(())
}

#[test]
fn overlay_and_port_churn_on_file() -> Result<()> {
    overlay_and_port_churn("nf", NbKind::File)
}

#[test]
fn overlay_and_port_churn_on_etcd() -> Result<()> {
    overlay_and_port_churn("ne", NbKind::Etcd(1))
}

#[test]
fn overlay_and_port_churn_on_redis() -> Result<()> {
    overlay_and_port_churn("nr", NbKind::Redis)
}

#[test]
fn overlay_and_port_churn_on_redis_cluster() -> Result<()> {
    overlay_and_port_churn("ncl", NbKind::RedisCluster)
}

#[test]
fn etcd_leader_loss_loses_no_packets_and_changes_still_arrive() -> Result<()> {
    let mut tb = two_chassis_on("el", NbKind::Etcd(3))?;
    tb.ping("vm1", &tb.vm("vm3")?.ip.clone(), 1)?;
    tb.ping("vm4", &tb.vm("vm2")?.ip.clone(), 1)?;
    // Two streams, one each way, 3 s at 10k pps.
    let rx1 = tb.udp_receiver("vm3", 6300, 30_000, 3.0)?;
    let rx2 = tb.udp_receiver("vm2", 6301, 30_000, 3.0)?;
    let ip3 = tb.vm("vm3")?.ip.clone();
    let ip2 = tb.vm("vm2")?.ip.clone();
    let mut s1 = tb.udp_sender("vm1", &ip3, 6300, 30_000, 10_000)?;
    let mut s2 = tb.udp_sender("vm4", &ip2, 6301, 30_000, 10_000)?;
    std::thread::sleep(Duration::from_millis(800));
    let leader = tb.etcd_leader()?;
    tb.kill_server(leader);
    s1.wait()?;
    s2.wait()?;
    assert_eq!(
        Testbed::udp_result(rx1)?,
        30_000,
        "stream vm1 -> vm3 lost packets"
    );
    assert_eq!(
        Testbed::udp_result(rx2)?,
        30_000,
        "stream vm4 -> vm2 lost packets"
    );
    // A new leader is elected; a change made now reaches both agents.
    let new_leader = within(Duration::from_secs(10), || Ok(tb.etcd_leader().is_ok()))?;
    assert!(new_leader.is_some(), "no new etcd leader");
    tb.add_vm_unbound("vm5", "ch2", 5)?;
    let ip5 = tb.vm("vm5")?.ip.clone();
    let mut wrote = false;
    for _ in 0..50 {
        if tb
            .nbctl(&[
                "lsp-add",
                "ls1",
                "vm5",
                "0a:00:00:00:00:05",
                &ip5,
                "--key",
                "5",
            ])
            .is_ok()
        {
            wrote = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(wrote, "NB write after the election failed");
    tb.nbctl(&["lsp-bind", "vm5", "ch2", "vp-vm5"])?;
    // ch1 learns vm5 is remote (vm1 reaches it), ch2 attaches it (vm4, local, reaches it).
    for from in ["vm1", "vm4"] {
        within(Duration::from_secs(10), || Ok(reachable(&tb, from, &ip5)))?
            .with_context(|| format!("{from} never reached vm5 after the election"))?;
    }
    Ok(())
}

#[test]
fn nb_outage_is_headless_and_resyncs() -> Result<()> {
    let mut tb = two_chassis_on("no", NbKind::Etcd(1))?;
    tb.ping("vm1", &tb.vm("vm3")?.ip.clone(), 1)?;
    let rx = tb.udp_receiver("vm3", 6400, 30_000, 3.0)?;
    let ip3 = tb.vm("vm3")?.ip.clone();
    let mut s = tb.udp_sender("vm1", &ip3, 6400, 30_000, 10_000)?;
    std::thread::sleep(Duration::from_millis(500));
    tb.kill_server(0);
    // The agents notice and say so once, and keep forwarding.
    within(Duration::from_secs(5), || {
        Ok(tb.stats("ch1")?["nb"]["connected"] == false
            && tb.stats("ch2")?["nb"]["connected"] == false)
    })?
    .context("agents did not notice the NB outage")?;
    s.wait()?;
    assert_eq!(
        Testbed::udp_result(rx)?,
        30_000,
        "stream lost packets during the outage"
    );
    // New flows work headless too.
    tb.ping("vm2", &tb.vm("vm4")?.ip.clone(), 1)?;
    tb.start_server(0)?;
    tb.wait_db_healthy()?;
    within(Duration::from_secs(10), || {
        Ok(tb.stats("ch1")?["nb"]["connected"] == true
            && tb.stats("ch2")?["nb"]["connected"] == true)
    })?
    .context("agents did not reconnect")?;
    // A change made after the return is applied.
    let ip4 = tb.vm("vm4")?.ip.clone();
    tb.nbctl(&["lsp-del", "vm4"])?;
    within(Duration::from_secs(3), || Ok(!reachable(&tb, "vm1", &ip4)))?
        .context("deletion after the NB returned was not applied")?;
    let log = tb.agent_log("ch1");
    assert_eq!(log.matches("NB connection lost").count(), 1, "log:\n{log}");
    Ok(())
}

#[test]
fn selective_distribution_holds_only_served_tenants() -> Result<()> {
    require_root();
    let mut tb = Testbed::with_nb("sd", NbKind::Redis)?;
    tb.add_chassis("ch1")?;
    tb.add_chassis("ch2")?;
    tb.nbctl(&["ls-add", "red", "--key", "100", "--tenant", "red"])?;
    tb.nbctl(&["ls-add", "blue", "--key", "200", "--tenant", "blue"])?;
    tb.add_vm("r1", "ch1", "red", 1)?;
    tb.add_vm("b1", "ch2", "blue", 2)?;
    tb.nbctl(&["lsp-add", "red", "r2", "0a:00:00:00:00:22", "--key", "2"])?;
    tb.start_agents()?;
    let s1 = tb.stats("ch1")?;
    let s2 = tb.stats("ch2")?;
    let topics = |s: &serde_json::Value| s["nb"]["topics"].to_string();
    assert!(
        topics(&s1).contains("/gf/t/red/") && !topics(&s1).contains("/gf/t/blue/"),
        "{}",
        s1["nb"]
    );
    assert!(
        topics(&s2).contains("/gf/t/blue/") && !topics(&s2).contains("/gf/t/red/"),
        "{}",
        s2["nb"]
    );
    assert_eq!(
        s1["nb"]["records"]["ports"], 2,
        "ch1 holds red's two ports only: {}",
        s1["nb"]
    );
    assert_eq!(
        s2["nb"]["records"]["ports"], 1,
        "ch2 holds blue's port only: {}",
        s2["nb"]
    );
    // Bind a red port to ch2: it subscribes to red; unbind it: red's state goes.
    // The topics are set before the records they bring are counted: both are awaited.
    tb.nbctl(&["lsp-bind", "r2", "ch2", "vp-r2"])?;
    within(Duration::from_secs(3), || {
        let s = tb.stats("ch2")?;
        Ok(topics(&s).contains("/gf/t/red/") && s["nb"]["records"]["ports"] == 3)
    })?
    .with_context(|| format!("ch2 never subscribed to red: {:?}", tb.stats("ch2").ok()))?;
    tb.nbctl(&["lsp-unbind", "r2"])?;
    within(Duration::from_secs(3), || {
        let s = tb.stats("ch2")?;
        Ok(!topics(&s).contains("/gf/t/red/") && s["nb"]["records"]["ports"] == 1)
    })?
    .with_context(|| format!("ch2 kept red's topic: {:?}", tb.stats("ch2").ok()))?;
    Ok(())
}

#[test]
fn invalid_records_are_refused_or_skipped() -> Result<()> {
    let tb = two_chassis_on("ir", NbKind::Etcd(1))?;
    let refused = [
        vec!["subnet-add", "ls1", "s1", "10.0.0.0/33"],
        vec!["subnet-add", "ls1", "s1", "10.0.0.1/16"],
        vec!["lsp-add", "ls1", "dup", "0a:00:00:00:00:99", "--key", "1"],
        vec!["lsp-add", "nosuch", "x", "0a:00:00:00:00:98", "--key", "9"],
        vec!["lsp-bind", "vm1", "nosuch", "eth9"],
        vec![
            "lrp-add",
            "nosuch",
            "rp",
            "0a:00:00:00:01:01",
            "10.0.0.254/16",
            "--key",
            "9",
        ],
        vec!["fip-add", "f1", "203.0.113.5", "vm1", "nosuch"],
        vec!["sg-rule-add", "nosuch", "r1", "--direction", "ingress"],
    ];
    for args in refused {
        let err = tb
            .nbctl(&args)
            .expect_err(&format!("{args:?} was accepted"))
            .to_string();
        let line = err.lines().last().unwrap_or("");
        assert!(line.contains("geneflowctl: error:"), "{args:?}: {err}");
    }
    // Written behind geneflowctl's back: a port with a duplicate key and one that is not
    // JSON. The agent skips them with a log line and keeps forwarding.
    let db = tb.db_ns.clone().unwrap();
    let ep = format!("{}:2379", xtask::testbed::DB_IP);
    let bad = r#"{"name":"evil","switch":"ls1","mac":"0a:00:00:00:00:77","port_key":1,"chassis":"ch1","iface":"nope0"}"#;
    for (k, v) in [
        ("/gf/t/default/ports/evil", bad),
        ("/gf/t/default/ports/junk", "{not json"),
    ] {
        let st = Command::new("ip")
            .args([
                "netns",
                "exec",
                &db,
                "etcdctl",
                "--endpoints",
                &ep,
                "put",
                k,
                v,
            ])
            .stdout(Stdio::null())
            .status()?;
        assert!(st.success());
    }
    within(Duration::from_secs(3), || {
        let l = tb.agent_log("ch1");
        Ok(l.contains("NB record skipped") && l.contains("junk") && l.contains("evil"))
    })?
    .with_context(|| {
        format!(
            "agent did not report the bad records:\n{}",
            tb.agent_log("ch1")
        )
    })?;
    tb.ping("vm1", &tb.vm("vm3")?.ip.clone(), 2)?;
    tb.ping("vm2", &tb.vm("vm4")?.ip.clone(), 2)?;
    Ok(())
}

/// `redis-cli` for the testbed's Redis NB, in its namespace.
fn redis_cmd(tb: &Testbed) -> Result<Command> {
    let ns = tb.db_ns.clone().context("no NB namespace")?;
    let host = tb.nb.trim_start_matches("redis://").split(':').next();
    let mut c = Command::new("ip");
    c.args(["netns", "exec", &ns, "redis-cli", "-h", host.unwrap_or("")]);
    Ok(c)
}

/// `redis-cli ARGS` against the testbed's Redis NB.
fn redis_cli(tb: &Testbed, args: &[&str]) -> Result<String> {
    run(redis_cmd(tb)?.args(args))
}

#[test]
fn periodic_reconciliation_repairs_a_lost_notification() -> Result<()> {
    require_root();
    let mut tb = Testbed::with_nb("rc", NbKind::Redis)?;
    tb.add_chassis("ch1")?;
    tb.add_chassis("ch2")?;
    tb.nbctl(&["ls-add", "ls1", "--key", &LS1_KEY.to_string()])?;
    tb.add_vm("vm1", "ch1", "ls1", 1)?;
    tb.add_vm("vm3", "ch2", "ls1", 3)?;
    for c in tb.chassis.iter_mut() {
        c.agent_args = vec!["--nb-reconcile-secs".into(), "1".into()];
    }
    tb.start_agents()?;
    let ip3 = tb.vm("vm3")?.ip.clone();
    tb.ping("vm1", &ip3, 1)?;
    // Nothing diverges while the notifications flow: checks run, none repairs.
    let nb = |c: &str, k: &str| -> Result<u64> { Ok(tb.stats(c)?["nb"][k].as_u64().unwrap_or(0)) };
    within(Duration::from_secs(5), || {
        Ok(nb("ch1", "reconcile_checks")? >= 3)
    })?
    .context("ch1 never reconciled")?;
    assert_eq!(nb("ch1", "reconcile_repairs")?, 0);
    // vm3's port deleted the way a writer whose notification was lost would have: the
    // record and its topic's change counter, no PUBLISH. The agents hear nothing; the next
    // reconciliation finds it and takes vm3 off the overlay.
    let applied0 = [
        pipelines_applied(&tb, "ch1")?,
        pipelines_applied(&tb, "ch2")?,
    ];
    redis_cli(&tb, &["DEL", "/gf/t/default/ports/vm3"])?;
    redis_cli(&tb, &["INCR", "gf-rev:/gf/t/default/"])?;
    within(Duration::from_secs(5), || {
        Ok(nb("ch1", "reconcile_repairs")? >= 1 && nb("ch2", "reconcile_repairs")? >= 1)
    })?
    .context("the lost deletion was never repaired")?;
    // The repair is counted before the repaired tables are compiled and applied: that is
    // awaited on each chassis before the effects are checked.
    for (c, a0) in ["ch1", "ch2"].into_iter().zip(applied0) {
        wait_applied(&tb, c, a0)?;
        assert_eq!(tb.stats(c)?["nb"]["records"]["ports"], 1, "{c}");
        assert!(
            tb.agent_log(c).contains("NB reconciliation"),
            "{c} did not log the repair"
        );
    }
    assert!(!reachable(&tb, "vm1", &ip3), "vm3 still on the overlay");
    Ok(())
}

/// With every notification delivered, reconciliation runs and repairs nothing, whether the
/// store moved (a port added: the next check compares in full) or not.
fn reconciliation_is_quiet(tag: &str, kind: NbKind) -> Result<()> {
    require_root();
    let mut tb = Testbed::with_nb(tag, kind)?;
    tb.add_chassis("ch1")?;
    tb.nbctl(&["ls-add", "ls1", "--key", &LS1_KEY.to_string()])?;
    tb.add_vm("vm1", "ch1", "ls1", 1)?;
    tb.chassis[0].agent_args = vec!["--nb-reconcile-secs".into(), "1".into()];
    tb.start_agents()?;
    let nb = |k: &str| -> Result<u64> { Ok(tb.stats("ch1")?["nb"][k].as_u64().unwrap_or(0)) };
    within(Duration::from_secs(5), || Ok(nb("reconcile_checks")? >= 2))?
        .context("never reconciled")?;
    tb.nbctl(&["lsp-add", "ls1", "p9", "0a:00:00:00:00:99", "--key", "9"])?;
    let c0 = nb("reconcile_checks")?;
    within(Duration::from_secs(5), || {
        Ok(nb("reconcile_checks")? >= c0 + 2)
    })?
    .context("stopped reconciling")?;
    assert_eq!(tb.stats("ch1")?["nb"]["records"]["ports"], 2);
    assert_eq!(nb("reconcile_repairs")?, 0, "{}", tb.agent_log("ch1"));
    Ok(())
}

#[test]
fn reconciliation_is_quiet_on_etcd_file_and_redis_cluster() -> Result<()> {
    reconciliation_is_quiet("qe", NbKind::Etcd(1))?;
    reconciliation_is_quiet("qf", NbKind::File)?;
    reconciliation_is_quiet("qc", NbKind::RedisCluster)
}

/// `redis-cli -x ARGS`: the last argument read from `stdin` (values too big for argv).
fn redis_cli_stdin(tb: &Testbed, args: &[&str], stdin: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut c = redis_cmd(tb)?
        .arg("-x")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()?;
    c.stdin.take().context("stdin")?.write_all(stdin)?;
    anyhow::ensure!(c.wait()?.success(), "redis-cli -x {args:?} failed");
    Ok(())
}

#[test]
fn hostile_notifications_and_values_are_skipped() -> Result<()> {
    let tb = two_chassis_on("hv", NbKind::Redis)?;
    let (ip3, ip4) = (tb.vm("vm3")?.ip.clone(), tb.vm("vm4")?.ip.clone());
    tb.ping("vm1", &ip3, 1)?;
    tb.ping("vm2", &ip4, 1)?;
    // Garbage on a tenant's channel, and another tenant's record announced on it.
    redis_cli(&tb, &["PUBLISH", "/gf/t/default/", "not a key"])?;
    redis_cli(&tb, &["SET", "/gf/t/other/ports/x", "{}"])?;
    redis_cli(&tb, &["PUBLISH", "/gf/t/default/", "/gf/t/other/ports/x"])?;
    // vm4's port record replaced by 2 MB of (valid) JSON.
    let big = format!("{{\"pad\":\"{}\"}}", "x".repeat(2 << 20));
    redis_cli_stdin(&tb, &["SET", "/gf/t/default/ports/vm4"], big.as_bytes())?;
    redis_cli(
        &tb,
        &["PUBLISH", "/gf/t/default/", "/gf/t/default/ports/vm4"],
    )?;
    // vm3's port record at the top of the version range.
    let rec = redis_cli(&tb, &["GET", "/gf/t/default/ports/vm3"])?;
    let mut v: serde_json::Value = serde_json::from_str(rec.trim())?;
    v["version"] = serde_json::json!(u64::MAX);
    redis_cli(&tb, &["SET", "/gf/t/default/ports/vm3", &v.to_string()])?;
    redis_cli(
        &tb,
        &["PUBLISH", "/gf/t/default/", "/gf/t/default/ports/vm3"],
    )?;
    // The oversized record is skipped (its port leaves the overlay), the rest keeps working.
    within(Duration::from_secs(5), || Ok(!reachable(&tb, "vm2", &ip4)))?
        .context("the oversized record was applied")?;
    tb.ping("vm1", &ip3, 1)?;
    // Each chassis on its own: the one whose effect was seen above may be ahead.
    for c in ["ch1", "ch2"] {
        let ok = || -> Result<bool> {
            let nb = &tb.stats(c)?["nb"];
            let log = tb.agent_log(c);
            let oversized = "/gf/t/default/ports/vm4: value of 2097162 bytes, over the \
                             1048576-byte limit";
            Ok(nb["connected"] == true
                && nb["records"]["ports"] == 3
                && log.contains(oversized)
                && log.contains("outside this chassis's topics")
                && log.contains("/gf/t/other/ports/x"))
        };
        within(Duration::from_secs(5), ok)?.with_context(|| {
            format!(
                "{c}: connected with 3 ports, the oversized record and the foreign key named: \
                 nb {:?}\n{}",
                tb.stats(c).ok().map(|s| s["nb"].clone()),
                tb.agent_log(c)
            )
        })?;
    }
    // The record at the top of the version range stays updatable: vm3 joins a group that
    // lets nothing in, and vm1's pings stop.
    tb.nbctl(&["sg-add", "closed"])?;
    tb.nbctl(&["sg-rule-add", "closed", "out", "--direction", "egress"])?;
    tb.nbctl(&["lsp-set-sg", "vm3", "closed"])?;
    let rec = redis_cli(&tb, &["GET", "/gf/t/default/ports/vm3"])?;
    let v: serde_json::Value = serde_json::from_str(rec.trim())?;
    assert_eq!(v["version"], serde_json::json!(u64::MAX), "{v}");
    within(Duration::from_secs(5), || Ok(!reachable(&tb, "vm1", &ip3)))?
        .context("the update of the record at the top of the version range was ignored")?;
    Ok(())
}

#[test]
fn a_redis_nb_without_the_topic_index_is_read_and_indexed() -> Result<()> {
    let mut tb = two_chassis_on("ix", NbKind::Redis)?;
    let ip3 = tb.vm("vm3")?.ip.clone();
    tb.ping("vm1", &ip3, 1)?;
    // The store as a version without the index wrote it.
    for k in [
        "gf-topics",
        "gf-idx:/gf/global/",
        "gf-idx:/gf/t/default/",
        "gf-idx:/gf/bind/ch1/",
        "gf-idx:/gf/bind/ch2/",
    ] {
        redis_cli(&tb, &["DEL", k])?;
    }
    // An agent started on it reads everything (by SCAN).
    tb.kill_agent(0);
    tb.start_agent(0)?;
    tb.ping("vm1", &ip3, 2)?;
    assert_eq!(tb.stats("ch1")?["nb"]["records"]["ports"], 4);
    // The first write indexes the whole store, and agents read it through the index.
    tb.nbctl(&["lsp-add", "ls1", "p9", "0a:00:00:00:00:99", "--key", "9"])?;
    let idx = redis_cli(&tb, &["SMEMBERS", "gf-idx:/gf/t/default/"])?;
    for p in ["vm1", "vm2", "vm3", "vm4", "p9"] {
        assert!(
            idx.lines()
                .any(|l| l.trim() == format!("/gf/t/default/ports/{p}")),
            "{p} not indexed:\n{idx}"
        );
    }
    tb.kill_agent(1);
    tb.start_agent(1)?;
    tb.ping("vm2", &tb.vm("vm4")?.ip.clone(), 2)?;
    tb.ping("vm1", &ip3, 2)?;
    assert_eq!(tb.stats("ch2")?["nb"]["records"]["ports"], 5);
    Ok(())
}

#[test]
fn an_etcd_write_too_big_for_one_transaction_names_the_limit() -> Result<()> {
    require_root();
    let tb = Testbed::with_nb("tx", NbKind::Etcd(1))?;
    tb.nbctl(&["chassis-add", "chr", "198.18.0.99"])?;
    tb.nbctl(&["ls-add", "ls1", "--key", &LS1_KEY.to_string()])?;
    // 100 bound ports: 200 records in one write.
    let ns = tb.db_ns.clone().context("no NB namespace")?;
    let out = Command::new("ip")
        .args(["netns", "exec", &ns, &tb.bin("gf-nb-bench"), "populate"])
        .args([
            "--nb", &tb.nb, "--switch", "ls1", "--remote", "chr", "--ports", "100",
        ])
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the write went through");
    assert!(
        err.contains("a write of 200 records") && err.contains("--max-txn-ops"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    // Nothing of it was written; a write that fits goes through.
    let show = tb.nbctl(&["show"])?;
    assert!(!show.contains("m0"), "{show}");
    tb.nbctl(&["lsp-add", "ls1", "p1", "0a:00:00:00:00:11", "--key", "1"])?;
    Ok(())
}
