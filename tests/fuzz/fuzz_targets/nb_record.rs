//! The NB record decoder and everything an agent does with what it decodes: arbitrary keys
//! and values applied to the view, then validation and a compile for chassis "a". A record
//! that does not decode is refused; nothing panics.
#![no_main]

use geneflow_control::compiler::compile;
use geneflow_control::kv;
use geneflow_control::model::NbDocument;
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

fn base() -> &'static NbDocument {
    static D: OnceLock<NbDocument> = OnceLock::new();
    D.get_or_init(|| serde_json::from_str(include_str!("../nb.json")).expect("tests/fuzz/nb.json"))
}

/// Keys as the backends store them: one per table, and a binding.
const KEYS: [&str; 10] = [
    "/gf/global/chassis/a",
    "/gf/t/default/switches/ls1",
    "/gf/t/default/subnets/s1",
    "/gf/t/default/ports/p1",
    "/gf/t/default/routers/r",
    "/gf/t/default/router_ports/r-ls1",
    "/gf/t/default/routes/r:10.9.0.0_16",
    "/gf/t/default/security_groups/sg",
    "/gf/t/default/floating_ips/f",
    "/gf/bind/a/p1",
];

fuzz_target!(|data: &[u8]| {
    let mut doc = base().clone();
    // Records separated by 0xff; each starts with a byte choosing its key.
    for rec in data.split(|b| *b == 0xff) {
        let Some((&k, value)) = rec.split_first() else {
            continue;
        };
        let key = KEYS[k as usize % KEYS.len()];
        let value = (k & 0x80 == 0).then_some(value);
        let _ = kv::apply(&mut doc, key, value);
    }
    let v = doc.validated();
    let p = compile(&v.doc, "a");
    assert_eq!(p.chassis, "a");
});
