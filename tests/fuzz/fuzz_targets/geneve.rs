//! The Geneve codec on arbitrary bytes: parsing never panics, a parsed header's lengths stay
//! within the buffer, and the options it walks add up to the options area.
#![no_main]

use geneflow_datapath::wire::geneve::{OptionIter, Packet, Repr};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(p) = Packet::new_checked(data) else {
        return;
    };
    assert!(p.header_len() <= data.len());
    assert_eq!(p.options().len(), p.options_len());
    assert_eq!(p.header_len() + p.payload().len(), data.len());
    let walked: usize = OptionIter::new(p.options())
        .map_while(Result::ok)
        .map(|o| 4 + o.data.len())
        .sum();
    assert!(walked <= p.options_len());
    if let Ok(r) = Repr::parse(&p) {
        assert_eq!(r.vni, p.vni());
        if let Some(m) = r.ovn {
            assert_eq!(
                geneflow_datapath::wire::geneve::OvnMetadata::from_value(m.value()),
                m
            );
        }
    }
});
