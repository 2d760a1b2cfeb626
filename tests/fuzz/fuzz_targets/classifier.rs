//! The whole slow-path classifier on arbitrary frames from a VM port or the uplink, against
//! a topology with two switches, a router, a static route, port security on and off and an
//! allowed pair (tests/fuzz/nb.json): never a panic, and every verdict is consistent (outputs
//! inside the frame, a megaflow whose key is its own masked key, drop entries only for
//! verdicts XDP may repeat).
#![no_main]

use geneflow_control::compiler::compile;
use geneflow_control::model::NbDocument;
use geneflow_datapath::pipeline::Tables;
use libfuzzer_sys::fuzz_target;
use std::sync::{Arc, OnceLock};

const UPLINK: u32 = 2;
/// Interfaces of chassis "a"'s ports (p1, p3, p4) and the uplink.
const IFINDEXES: [u32; 4] = [10, 11, 12, UPLINK];

fn tables() -> &'static Tables {
    static T: OnceLock<Tables> = OnceLock::new();
    T.get_or_init(|| {
        let doc: NbDocument =
            serde_json::from_str(include_str!("../nb.json")).expect("tests/fuzz/nb.json");
        Tables::new(
            Arc::new(compile(&doc, "a")),
            UPLINK,
            1500,
            true,
            |n| match n {
                "vp-p1" => Some(10),
                "vp-p3" => Some(11),
                "vp-p4" => Some(12),
                _ => None,
            },
        )
    })
}

fuzz_target!(|data: &[u8]| {
    // The first byte picks the interface, the second is the conntrack state XDP sent along.
    let [sel, ct_state, frame @ ..] = data else {
        return;
    };
    let in_ifindex = IFINDEXES[*sel as usize % IFINDEXES.len()];
    let (mut out, mut buf) = (Vec::new(), Vec::new());
    match tables().process_dropping(frame, in_ifindex, (*ct_state, 0), &mut out, &mut buf) {
        Ok(d) => {
            assert!(d.payload_offset <= frame.len());
            if let Some(m) = d.megaflow {
                assert_eq!(m.key, m.key.masked(&m.mask));
            }
        }
        Err(dropped) => {
            assert!(out.is_empty());
            if let Some(m) = dropped.megaflow {
                assert!(dropped.reason.cacheable());
                assert_eq!(m.key, m.key.masked(&m.mask));
            }
        }
    }
});
