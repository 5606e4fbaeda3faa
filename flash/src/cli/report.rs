//! What flash prints of a written device: its lines, and its JSON object.

use flash::session::Written;
use flash::trust::Signed;
use flash::write::Outcome;

/// The lines of a device written, said through `say` (above the bars);
/// its JSON.
pub fn done(
    w: &Written,
    o: &Outcome,
    signed: Option<&Signed>,
    say: &dyn Fn(&str),
) -> serde_json::Value {
    let probe = if w.probed { "passed" } else { "not probed" };
    if let Some(p) = &w.provisioned {
        say(&format!(
            "flash: {}: {}state partition {} bytes{}{}",
            o.device,
            w.identity
                .as_ref()
                .map(|d| format!("identity {} ({} files), ", d.display(), p.files))
                .unwrap_or_default(),
            p.state_size,
            p.machine_id
                .as_ref()
                .map(|m| format!(", machine-id {m}"))
                .unwrap_or_default(),
            p.host_key
                .as_ref()
                .map(|k| format!(", host key {} ({})", k.fingerprint, k.public.trim()))
                .unwrap_or_default()
        ));
    }
    say(&format!(
        "flash: {}: wrote {} bytes, skipped {}, verified {}, {:.1} s, {:.0} MB/s, fake-capacity probe {probe}{}",
        o.device,
        o.written,
        o.skipped,
        o.verified,
        o.seconds,
        o.mb_per_s,
        if o.gpt_moved {
            ", backup GPT moved to the end of the disk"
        } else {
            ""
        }
    ));
    let t = &w.target;
    let p = w.provisioned.as_ref();
    serde_json::json!({
        "device": o.device,
        "ok": true,
        "model": t.disk.model,
        "serial": t.disk.serial,
        "size": t.disk.size,
        "identity": w.identity,
        "machine_id": p.and_then(|p| p.machine_id.clone()),
        "host_key": p.and_then(|p| p.host_key.clone()),
        "state_size": p.map(|p| p.state_size),
        "probe": probe,
        "signed": signed,
        "report": o,
    })
}
