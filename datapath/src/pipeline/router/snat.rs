//! Router SNAT: floating IPs and default SNAT on the gateway port land with issue 11. The seam
//! is here so the trace shows the stage.

use super::super::{DropReason, Run};
use geneflow_control::compiler::Router;

pub(in super::super) fn run(r: &mut Run, _router: &Router) -> Result<(), DropReason> {
    r.note("snat", || "no source translation applies".into());
    Ok(())
}
