//! Router DNAT: floating IPs (external address -> fixed IP) land with issue 11. The seam is
//! here so the trace shows the stage.

use super::super::{DropReason, Run};
use geneflow_control::compiler::Router;

pub(in super::super) fn run(r: &mut Run, _router: &Router) -> Result<(), DropReason> {
    r.note("dnat", || "no floating IP applies".into());
    Ok(())
}
