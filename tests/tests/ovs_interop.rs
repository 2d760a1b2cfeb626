//! Interop: a VM behind a geneflow chassis and a VM behind an Open vSwitch userspace chassis
//! (netdev datapath, OVS userspace Geneve tunneling, the OVN option mapped to tun_metadata0)
//! ping each other and exchange UDP streams with no loss, each side setting the OVN option's
//! port keys and the other honouring them.

use anyhow::Result;
use geneflow_tests::*;

#[test]
fn geneflow_and_ovs_userspace_chassis_interoperate() -> Result<()> {
    require_root();
    let mut tb = Testbed::new("ov")?;
    tb.add_chassis("ch1")?;
    tb.nbctl(&["ls-add", "ls1", "--key", &LS1_KEY.to_string()])?;
    tb.add_vm("vm1", "ch1", "ls1", 1)?;
    tb.add_ovs_chassis("ovs", "198.18.0.1", false)?;
    let vm1_mac = tb.vm("vm1")?.mac.clone();
    tb.add_ovs_vm("vm2", "ovs", "ls1", LS1_KEY, 2, &[(vm1_mac, 1)])?;
    tb.start_agents()?;
    let (ip1, ip2) = (tb.vm("vm1")?.ip.clone(), tb.vm("vm2")?.ip.clone());
    tb.ping("vm1", &ip2, 3)?;
    tb.ping("vm2", &ip1, 3)?;
    let got = tb.udp_stream("vm1", "vm2", 6500, 5_000, 20_000)?;
    assert_eq!(got, 5_000, "geneflow -> OVS lost {}", 5_000 - got);
    let got = tb.udp_stream("vm2", "vm1", 6501, 5_000, 20_000)?;
    assert_eq!(got, 5_000, "OVS -> geneflow lost {}", 5_000 - got);
    // geneflow decapsulated OVS's frames in XDP (it honoured egress key 1 from OVS) and
    // dropped nothing.
    assert!(tb.counter("ch1", "ul", "fastpath_hit")? >= 4_900);
    let s = tb.stats("ch1")?;
    for p in s["ports"].as_array().unwrap() {
        for (k, v) in p["counters"].as_object().unwrap() {
            if k.starts_with("drop_") {
                assert_eq!(v.as_u64(), Some(0), "{}: {k} = {v}", p["iface"]);
            }
        }
    }
    // OVS matched geneflow's egress key 2 (its flow counted packets; OVS pushes datapath
    // statistics to OpenFlow rules lazily, so only "some" is certain).
    let flows = tb.ofctl("ovs", &["dump-flows", "br-int"])?;
    let hit = flows
        .lines()
        .find(|l| l.contains("tun_metadata0=0x2,") || l.contains("tun_metadata0=0x2/0xffff"))
        .unwrap_or("");
    let n: u64 = hit
        .split("n_packets=")
        .nth(1)
        .and_then(|r| r.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(n > 0, "OVS flow for egress key 2 saw no packets:\n{flows}");
    Ok(())
}
