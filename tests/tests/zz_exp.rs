use anyhow::Result;
use geneflow_tests::*;

#[test]
#[ignore]
fn exp() -> Result<()> {
    let mut tb = Testbed::new("bx")?;
    tb.add_chassis_pair_direct("ch1", "ch2")?;
    tb.nbctl(&["ls-add", "ls1", "--key", "1000"])?;
    tb.add_vm("vm1", "ch1", "ls1", 1)?;
    tb.add_vm("vm3", "ch2", "ls1", 3)?;
    tb.start_agents()?;
    tb.ping("vm1", &tb.vm("vm3")?.ip.clone(), 2)?;
    let vm1 = tb.vm("vm1")?.clone();
    let info = serde_json::json!({"dir": tb.dir, "vm1ns": vm1.ns});
    std::fs::write("/tmp/prof/tb.json", info.to_string())?;
    std::fs::write("/tmp/prof/ready", "")?;
    while std::path::Path::new("/tmp/prof/ready").exists() {
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    Ok(())
}
