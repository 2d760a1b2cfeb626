//! One run of the pipeline over one frame, as every stage sees it: the frame's key, the
//! mask of the fields consulted so far, and what the run decided to commit or translate.

use super::{Answer, AnswerKind, Decision, Megaflow, Output, Tables};
use geneflow_abi::{flow_hash, FlowAction, FlowKey};
use std::net::Ipv4Addr;

/// One run of the pipeline over one frame: the key of the frame, the fields consulted so far
/// (the megaflow mask) and, for `trace`, what each stage decided.
pub(crate) struct Run<'a> {
    pub t: &'a Tables,
    pub frame: &'a [u8],
    pub in_ifindex: u32,
    pub key: FlowKey,
    pub mask: FlowKey,
    /// Generation slot the verdict depends on, once known (the datapath, or
    /// `DP_KEY_HOSTED` for an unknown VNI).
    pub dp_key: Option<u32>,
    /// The conntrack state XDP found for the frame (`ct::*`), set into the key by the stages
    /// that extract it.
    pub ct_state: u8,
    /// Zones the frame's new connection is committed in (an ACL allowed it).
    pub ct_commit: [u32; 2],
    /// Floating-IP translation a router decided: new source / destination.
    pub nat_src: Option<Ipv4Addr>,
    pub nat_dst: Option<Ipv4Addr>,
    /// Default SNAT through this external address (no floating IP).
    pub napt: Option<Ipv4Addr>,
    /// The VLAN tag XDP took off a provider frame (`VLAN_PRESENT | vid`), or 0.
    pub vlan: u16,
    trace: Option<&'a mut Vec<String>>,
}

impl<'a> Run<'a> {
    pub(super) fn new(
        t: &'a Tables,
        frame: &'a [u8],
        in_ifindex: u32,
        ct_state: u8,
        trace: Option<&'a mut Vec<String>>,
    ) -> Run<'a> {
        Run {
            t,
            frame,
            in_ifindex,
            key: FlowKey::zeroed(),
            mask: FlowKey::zeroed(),
            dp_key: None,
            ct_state,
            ct_commit: [0; 2],
            nat_src: None,
            nat_dst: None,
            napt: None,
            vlan: 0,
            trace,
        }
    }

    /// Records what `stage` decided (only when tracing: the closure is not run otherwise).
    pub fn note(&mut self, stage: &str, f: impl FnOnce() -> String) {
        if let Some(t) = self.trace.as_mut() {
            t.push(format!("{stage}: {}", f()));
        }
    }

    pub fn decision(&self, payload_offset: usize) -> Decision {
        Decision {
            payload_offset,
            rewritten: false,
            flow_hash: flow_hash(&self.key),
            megaflow: None,
            answer: None,
            ct_commit: self.ct_commit,
            key: self.key,
            learn: None,
            napt: None,
            nat: (self.nat_src, self.nat_dst),
        }
    }

    /// The decision for an answer the pipeline wrote into the caller's buffer: sent only if
    /// `source` is within its rate.
    pub fn answered(&self, kind: AnswerKind, source: Ipv4Addr) -> Decision {
        let mut d = self.decision(0);
        d.rewritten = true;
        d.answer = Some(Answer { kind, source });
        d
    }

    /// Where an answer to the frame goes: back out of the port it came in on, and on a
    /// provider network on the VLAN it came on.
    pub fn back_out(&self) -> Output {
        if self.t.is_provider(self.in_ifindex) {
            Output::Provider {
                ifindex: self.in_ifindex,
                vlan: self.vlan,
            }
        } else {
            Output::Local {
                ifindex: self.in_ifindex,
            }
        }
    }

    /// Commits the frame's connection in `zone` too.
    pub fn commit(&mut self, zone: u32) {
        if self.ct_commit.contains(&zone) {
            return;
        }
        if let Some(z) = self.ct_commit.iter_mut().find(|z| **z == 0) {
            *z = zone;
        }
    }

    /// `action` with the conntrack commit of this run, if any.
    pub fn with_commit(&self, mut action: FlowAction) -> FlowAction {
        if self.ct_commit != [0, 0] {
            action.flags |= geneflow_abi::flag::CT_COMMIT;
            action.ct_zones = self.ct_commit;
        }
        action
    }

    /// The megaflow of this run: the key under the accumulated mask, with `action`.
    pub fn megaflow(&self, action: FlowAction) -> Megaflow {
        Megaflow {
            key: self.key.masked(&self.mask),
            mask: self.mask,
            action,
        }
    }
}
