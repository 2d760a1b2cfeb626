//! End-to-end: the NB in etcd with its changes fanned out by `geneflow-publisher` over
//! ZeroMQ (agents take no etcd watch). Changes reach the agents through the publisher; a
//! publisher killed and restarted, or one of two killed, loses no change; a sequence gap
//! makes an agent read its topics again; garbage from a publisher or a writer is skipped and
//! counted; an agent hears nothing of a tenant it has no port of.

use anyhow::{Context, Result};
use geneflow_tests::*;
use std::time::Duration;
use xtask::testbed::PUBLISHER_PORT;

const FORGER_PORT: u16 = 6690;
const DEFAULT_TOPIC: &str = "/gf/t/default/";

fn transport(tb: &Testbed, chassis: &str, k: &str) -> Result<u64> {
    Ok(tb.stats(chassis)?["nb"]["transport"][k]
        .as_u64()
        .unwrap_or(0))
}

/// Plays the forger's script and waits until it is sent.
fn play(tb: &Testbed, go: &std::path::Path, script: &str) -> Result<()> {
    std::fs::write(go, b"")?;
    let i = tb
        .servers
        .iter()
        .position(|s| s.args().iter().any(|a| std::path::Path::new(a) == go))
        .context("no forger of that go file")?;
    tb.wait_server_log(i, &format!("sent {script}"))
}

#[test]
fn changes_flow_through_the_publisher_and_survive_its_restart() -> Result<()> {
    let mut tb = two_chassis_on("zr", NbKind::EtcdZmq(1))?;
    let (ip3, ip4) = (tb.vm("vm3")?.ip.clone(), tb.vm("vm4")?.ip.clone());
    tb.ping("vm1", &ip3, 1)?;
    tb.ping("vm2", &ip4, 1)?;
    let nb = tb.stats("ch1")?["nb"].clone();
    assert_eq!(nb["backend"], "etcd+zmq", "{nb}");
    within(Duration::from_secs(5), || {
        Ok(transport(&tb, "ch1", "publishers_alive")? == 1)
    })?
    .context("ch1 never heard the publisher")?;
    // A change made while the publisher is down reaches nobody (agents do not watch etcd)...
    let p = tb.server_on(PUBLISHER_PORT)?;
    tb.kill_server(p);
    tb.nbctl(&["lsp-del", "vm4"])?;
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        reachable(&tb, "vm2", &ip4),
        "the change arrived without a publisher: not the ZeroMQ path"
    );
    // ...until it is back: its new epoch makes every agent read its topics again.
    let losses = transport(&tb, "ch1", "losses")?;
    tb.start_server(p)?;
    within(Duration::from_secs(10), || Ok(!reachable(&tb, "vm2", &ip4)))?
        .context("the change made while the publisher was down never arrived")?;
    assert!(transport(&tb, "ch1", "losses")? > losses);
    assert!(tb.agent_log("ch1").contains("NB notifications lost"));
    // And changes flow again as they are made.
    tb.add_vm_unbound("vm5", "ch2", 5)?;
    let ip5 = tb.vm("vm5")?.ip.clone();
    add_port_of_vm5(&tb)?;
    within(Duration::from_secs(5), || Ok(reachable(&tb, "vm1", &ip5)))?
        .context("a port added after the restart never carried traffic")?;
    assert!(transport(&tb, "ch1", "messages")? >= 2);
    Ok(())
}

#[test]
fn two_publishers_carry_changes_while_one_is_down() -> Result<()> {
    let mut tb = two_chassis_on("z2", NbKind::EtcdZmq(2))?;
    let ip4 = tb.vm("vm4")?.ip.clone();
    tb.ping("vm2", &ip4, 1)?;
    within(Duration::from_secs(5), || {
        Ok(transport(&tb, "ch1", "publishers_alive")? == 2)
    })?
    .context("ch1 never heard both publishers")?;
    let p0 = tb.server_on(PUBLISHER_PORT)?;
    tb.kill_server(p0);
    let resyncs = tb.stats("ch1")?["nb"]["resyncs"].as_u64().unwrap_or(0);
    tb.nbctl(&["lsp-del", "vm4"])?;
    within(Duration::from_secs(3), || Ok(!reachable(&tb, "vm2", &ip4)))?
        .context("the change never came through the second publisher")?;
    // Carried by the live publisher, not by a read of the store.
    assert_eq!(
        tb.stats("ch1")?["nb"]["resyncs"].as_u64().unwrap_or(0),
        resyncs
    );
    within(Duration::from_secs(5), || {
        Ok(transport(&tb, "ch1", "publishers_alive")? == 1)
    })?
    .context("ch1 never counted the dead publisher down")?;
    tb.start_server(p0)?;
    within(Duration::from_secs(5), || {
        Ok(transport(&tb, "ch1", "publishers_alive")? == 2)
    })?
    .context("ch1 never heard the restarted publisher")?;
    // Its restart lost nothing the other did not deliver: no agent read its topics again.
    within(Duration::from_secs(3), || {
        Ok(transport(&tb, "ch1", "covered")? >= 1)
    })?
    .context("ch1 never saw the restart")?;
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        tb.stats("ch1")?["nb"]["resyncs"].as_u64().unwrap_or(0),
        resyncs,
        "a covered restart made ch1 read its topics again"
    );
    tb.add_vm_unbound("vm5", "ch2", 5)?;
    let ip5 = tb.vm("vm5")?.ip.clone();
    add_port_of_vm5(&tb)?;
    within(Duration::from_secs(5), || Ok(reachable(&tb, "vm1", &ip5)))?
        .context("a port added after the restart never carried traffic")?;
    Ok(())
}

#[test]
fn a_sequence_gap_makes_the_agent_read_its_topics_again() -> Result<()> {
    // The forger is the only publisher: a loss on it is covered by no other.
    let mut go = None;
    let tb = two_chassis_with("zg", NbKind::EtcdZmq(0), 1, |tb| {
        go = Some(tb.add_forger(FORGER_PORT, "gap,tail", DEFAULT_TOPIC)?);
        Ok(())
    })?;
    let ip3 = tb.vm("vm3")?.ip.clone();
    tb.ping("vm1", &ip3, 1)?;
    within(Duration::from_secs(5), || {
        Ok(transport(&tb, "ch1", "publishers_alive")? == 1)
    })?
    .context("ch1 never heard the forger")?;
    // vm3's port deleted in etcd behind every publisher's back: nobody is told.
    tb.etcdctl(&["del", "/gf/t/default/ports/vm3"])?;
    std::thread::sleep(Duration::from_secs(1));
    assert!(reachable(&tb, "vm1", &ip3), "the silent deletion arrived");
    assert_eq!(transport(&tb, "ch1", "losses")?, 0);
    // A hole in the forger's numbering of the tenant's topic: ch1 reads it again, and with
    // it the deletion.
    play(&tb, go.as_ref().context("no go file")?, "gap")?;
    within(Duration::from_secs(5), || Ok(!reachable(&tb, "vm1", &ip3)))?
        .context("the gap did not make ch1 read its topics again")?;
    assert!(transport(&tb, "ch1", "losses")? >= 1);
    let log = tb.agent_log("ch1");
    assert!(
        log.contains("NB notifications lost") && log.contains("message 3 after 1, 1 lost"),
        "{log}"
    );
    // A lost last message (a subscriber that fell behind its queue): nothing follows it, but
    // the publisher's next Sync announces it. vm4's port deleted silently, then that Sync.
    let ip4 = tb.vm("vm4")?.ip.clone();
    tb.etcdctl(&["del", "/gf/t/default/ports/vm4"])?;
    std::thread::sleep(Duration::from_secs(1));
    assert!(reachable(&tb, "vm2", &ip4), "the silent deletion arrived");
    let losses = transport(&tb, "ch1", "losses")?;
    play(&tb, go.as_ref().context("no go file")?, "tail")?;
    within(Duration::from_secs(5), || Ok(!reachable(&tb, "vm2", &ip4)))?
        .context("the announced lost tail did not make ch1 read its topics again")?;
    assert!(transport(&tb, "ch1", "losses")? > losses);
    assert!(tb
        .agent_log("ch1")
        .contains("at message 4, last received 3"));
    Ok(())
}

#[test]
fn garbage_from_a_publisher_or_a_writer_is_skipped_and_counted() -> Result<()> {
    let mut gos = Vec::new();
    let tb = two_chassis_with("zj", NbKind::EtcdZmq(1), 1, |tb| {
        gos.push(tb.add_forger(FORGER_PORT, "garbage", DEFAULT_TOPIC)?);
        gos.push(tb.add_forger(PUBLISHER_PORT, "push-garbage", DEFAULT_TOPIC)?);
        Ok(())
    })?;
    let ip3 = tb.vm("vm3")?.ip.clone();
    tb.ping("vm1", &ip3, 1)?;
    within(Duration::from_secs(5), || {
        Ok(transport(&tb, "ch1", "publishers_alive")? == 2)
    })?
    .context("ch1 never heard the publisher and the forger")?;
    let applied = pipelines_applied(&tb, "ch1")?;
    play(&tb, &gos[0], "garbage")?;
    within(Duration::from_secs(5), || {
        Ok(transport(&tb, "ch1", "refused")? >= 11)
    })?
    .context("ch1 did not refuse the eleven malformed messages")?;
    // Nothing of them applied (vm3's deletion came with a foreign key), nothing lost.
    assert!(reachable(&tb, "vm1", &ip3), "a refused message was applied");
    let nb = tb.stats("ch1")?["nb"].clone();
    assert_eq!(nb["records"]["ports"], 4, "{nb}");
    assert_eq!(nb["transport"]["losses"], 0, "{nb}");
    assert_eq!(pipelines_applied(&tb, "ch1")?, applied);
    let log = tb.agent_log("ch1");
    for what in [
        "ZeroMQ notification skipped",
        "/gf/t/other/ports/x",
        "\"/gf/t/default/ports/vm3\": value of 2097152 bytes",
        "header magic 0x00",
        "unknown message kind 9",
        "changes cut short",
        "a Heartbeat message on topic \"/gf/t/default/\"",
        "a Changes message on topic \"gf-hb\"",
    ] {
        assert!(log.contains(what), "ch1 did not log {what:?}:\n{log}");
    }
    // Malformed writes: the publisher drops each with its reason and goes on.
    play(&tb, &gos[1], "push-garbage")?;
    let p = tb.server_on(PUBLISHER_PORT)?;
    within(Duration::from_secs(5), || {
        Ok(tb
            .server_log(p)
            .matches("write notification dropped")
            .count()
            >= 5)
    })?
    .context("the publisher did not drop the five malformed writes")?;
    assert!(tb.server_log(p).contains("/gf/t/other/ports/x"));
    tb.nbctl(&["lsp-del", "vm3"])?;
    within(Duration::from_secs(3), || Ok(!reachable(&tb, "vm1", &ip3)))?
        .context("changes stopped flowing after the garbage")?;
    Ok(())
}

#[test]
fn an_agent_hears_nothing_of_a_tenant_it_has_no_port_of() -> Result<()> {
    let tb = two_chassis_on("zs", NbKind::EtcdZmq(1))?;
    tb.ping("vm1", &tb.vm("vm3")?.ip.clone(), 1)?;
    // Tenant blue: one port, bound to ch2.
    tb.nbctl(&["ls-add", "blue", "--key", "900", "--tenant", "blue"])?;
    tb.nbctl(&["lsp-add", "blue", "b0", "0a:00:00:00:0b:00", "--key", "1"])?;
    tb.nbctl(&["lsp-bind", "b0", "ch2", "vp-b0"])?;
    within(Duration::from_secs(5), || {
        let topics = tb.stats("ch2")?["nb"]["topics"].to_string();
        Ok(topics.contains("/gf/t/blue/"))
    })?
    .context("ch2 never followed tenant blue")?;
    std::thread::sleep(Duration::from_millis(500));
    let (m1, m2) = (
        transport(&tb, "ch1", "messages")?,
        transport(&tb, "ch2", "messages")?,
    );
    for i in 1..=10 {
        tb.nbctl(&[
            "lsp-add",
            "blue",
            &format!("b{i}"),
            &format!("0a:00:00:00:0b:{i:02x}"),
            "--key",
            &(i + 1).to_string(),
        ])?;
    }
    within(Duration::from_secs(5), || {
        Ok(transport(&tb, "ch2", "messages")? >= m2 + 10)
    })?
    .context("ch2 did not receive blue's ten changes")?;
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        transport(&tb, "ch1", "messages")?,
        m1,
        "ch1 received messages of a tenant it has no port of"
    );
    assert!(!tb.stats("ch1")?["nb"]["topics"]
        .to_string()
        .contains("/gf/t/blue/"));
    Ok(())
}
