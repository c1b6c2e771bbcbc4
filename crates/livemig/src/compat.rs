//! Compatibility descriptors: what a source host offers and a destination needs, exported as
//! JSON for orchestration (`livemig compat export`), checked host to host (`compat check`) and,
//! per device, exchanged in the stream's Compat records before any state moves.

use serde::{Deserialize, Serialize};

use crate::device::DeviceCompat;

/// The descriptor format tag.
pub const FORMAT: &str = "livemig-compat/1";

/// One device as the migration sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceDescriptor {
    /// What the device itself reports.
    #[serde(flatten)]
    pub device: DeviceCompat,
    /// The device's IOMMU domain tracks dirty pages.
    pub iommu_dirty_tracking: bool,
    /// IOMMU page sizes of the device's domain (bit n = 2^n bytes).
    pub page_size_mask: u64,
    /// Whether `migration_flags` and `dma_logging` were read from the device. A read-only
    /// export (`livemig compat export --host` without `--open`) does not open devices, so it
    /// cannot know them; the check then notes the gap instead of refusing. Descriptors
    /// without the field (older exports) always read them.
    #[serde(default = "yes")]
    pub migration_flags_known: bool,
}

fn yes() -> bool {
    true
}

/// A host's descriptor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostDescriptor {
    /// Always [`FORMAT`].
    pub format: String,
    /// Where it came from (host name, or `simulated <vendor>`).
    pub host: String,
    /// The IOMMU (vendor and whether it tracks dirty pages), as far as known.
    pub iommu: String,
    /// The devices, in migration order.
    pub devices: Vec<DeviceDescriptor>,
}

impl HostDescriptor {
    /// Checks the format tag of a parsed descriptor (the serialisation itself, JSON in the
    /// CLI, is the caller's choice: the engine carries no JSON dependency).
    pub fn check_format(&self) -> Result<(), String> {
        if self.format != FORMAT {
            return Err(format!(
                "descriptor format {:?} is not {FORMAT:?}",
                self.format
            ));
        }
        Ok(())
    }
}

/// A verdict: blocking reasons and non-blocking notes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Verdict {
    /// Whether the source's devices can migrate to the destination.
    pub compatible: bool,
    /// Why not (empty when compatible).
    pub reasons: Vec<String>,
    /// Worth knowing, not blocking.
    pub notes: Vec<String>,
}

const FLAG_NAMES: [(u32, &str); 3] = [(1, "STOP_COPY"), (2, "P2P"), (4, "PRE_COPY")];

/// Names of VFIO migration flags.
pub fn flag_names(flags: u32) -> Vec<&'static str> {
    FLAG_NAMES
        .iter()
        .filter(|(b, _)| flags & b != 0)
        .map(|&(_, n)| n)
        .collect()
}

/// Checks that the `src` devices can move onto the `dst` devices, index by index.
pub fn check(src: &[DeviceDescriptor], dst: &[DeviceDescriptor]) -> Verdict {
    let mut v = Verdict::default();
    if src.len() != dst.len() {
        v.reasons.push(format!(
            "the source has {} device(s), the destination {}",
            src.len(),
            dst.len()
        ));
    }
    for (i, (s, d)) in src.iter().zip(dst).enumerate() {
        let (sd, dd) = (&s.device, &d.device);
        if sd.identity != dd.identity {
            v.reasons.push(format!(
                "device {i}: identity {:?} on the source, {:?} on the destination",
                sd.identity, dd.identity
            ));
        }
        if sd.compat != dd.compat {
            v.reasons.push(format!(
                "device {i} ({}): compatibility block differs (source {}, destination {})",
                sd.identity,
                show(&sd.compat),
                show(&dd.compat)
            ));
        }
        if !s.migration_flags_known || !d.migration_flags_known {
            v.notes.push(format!(
                "device {i} ({}): migration flags and DMA logging unknown on the {} (exported \
                 without --open); not checked",
                sd.identity,
                match (s.migration_flags_known, d.migration_flags_known) {
                    (false, false) => "source and the destination",
                    (false, true) => "source",
                    _ => "destination",
                }
            ));
        } else if dd.migration_flags & 1 == 0 {
            v.reasons.push(format!(
                "device {i} ({}): the destination device is not migratable (no STOP_COPY)",
                dd.identity
            ));
        }
        let missing = sd.migration_flags & !dd.migration_flags;
        if missing != 0 && s.migration_flags_known && d.migration_flags_known {
            v.reasons.push(format!(
                "device {i} ({}): the source uses {} which the destination device lacks",
                sd.identity,
                flag_names(missing).join("|")
            ));
        }
        if s.page_size_mask != 0 {
            let min = s.page_size_mask & s.page_size_mask.wrapping_neg();
            if d.page_size_mask & min == 0 {
                v.reasons.push(format!(
                    "device {i} ({}): the destination IOMMU cannot map {} KiB pages the source \
                     uses (destination page sizes {:#x})",
                    sd.identity,
                    min >> 10,
                    d.page_size_mask
                ));
            }
        }
        if !d.iommu_dirty_tracking && !dd.dma_logging && d.migration_flags_known {
            v.notes.push(format!(
                "device {i} ({}): the destination has neither IOMMU dirty tracking nor DMA \
                 logging for it, so the VM could not migrate away from there",
                dd.identity
            ));
        }
    }
    v.compatible = v.reasons.is_empty();
    v
}

/// A compatibility block as text when it is printable text (a BAR layout), else in hex.
fn show(b: &[u8]) -> String {
    match std::str::from_utf8(b) {
        Ok(t) if !t.is_empty() && t.chars().all(|c| c == ' ' || c.is_ascii_graphic()) => {
            format!("{t:?}")
        }
        _ => hex(b),
    }
}

fn hex(b: &[u8]) -> String {
    if b.is_empty() {
        return "empty".into();
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev(identity: &str, compat: &[u8], flags: u32) -> DeviceDescriptor {
        DeviceDescriptor {
            device: DeviceCompat {
                identity: identity.into(),
                compat: compat.to_vec(),
                migration_flags: flags,
                dma_logging: false,
            },
            iommu_dirty_tracking: true,
            page_size_mask: 0x4020_1000,
            migration_flags_known: true,
        }
    }

    #[test]
    fn a_bar_layout_difference_is_refused_and_shown_as_text() {
        let a = [dev("pci 19e5:a251", b"bar2 0x8000 mem64 prefetchable", 5)];
        let b = [dev("pci 19e5:a251", b"bar2 0x10000 mem64 prefetchable", 5)];
        let v = check(&a, &b);
        assert_eq!(v.reasons.len(), 1, "{v:?}");
        assert!(
            v.reasons[0].contains(
                "(source \"bar2 0x8000 mem64 prefetchable\", destination \"bar2 0x10000 mem64 \
                 prefetchable\")"
            ),
            "{v:?}"
        );
    }

    #[test]
    fn unknown_migration_flags_are_noted_not_refused_and_old_descriptors_knew_them() {
        let mut a = [dev("mdev mtty-2", b"", 0)];
        a[0].migration_flags_known = false;
        let b = [dev("mdev mtty-2", b"", 7)];
        let v = check(&a, &b);
        assert!(v.compatible, "{v:?}");
        assert!(v.notes[0].contains("unknown on the source"), "{v:?}");
        // Known on both sides, the same flags are refused.
        let mut known = a.clone();
        known[0].migration_flags_known = true;
        let v = check(&b, &known);
        assert!(!v.compatible, "{v:?}");
        // An export from before the field: the flags were read.
        let j = serde_json::to_string(&b[0]).unwrap();
        let old = j.replace(",\"migration_flags_known\":true", "");
        assert_ne!(old, j);
        let d: DeviceDescriptor = serde_json::from_str(&old).unwrap();
        assert!(d.migration_flags_known);
    }

    #[test]
    fn verdict_names_every_difference() {
        let a = [dev("19e5:a256 sec", &[1, 2], 5)];
        assert!(check(&a, &a).compatible);
        let mut b = [dev("19e5:a256 sec", &[1, 3], 1)];
        b[0].page_size_mask = 0x20_0000;
        let v = check(&a, &b);
        assert!(!v.compatible);
        assert_eq!(v.reasons.len(), 3, "{v:?}");
        assert!(
            v.reasons[0].contains("compatibility block differs (source 0102, destination 0103)")
        );
        assert!(v.reasons[1].contains("uses PRE_COPY which the destination device lacks"));
        assert!(v.reasons[2].contains("cannot map 4 KiB pages"));
        let v = check(&a, &[]);
        assert_eq!(v.reasons, ["the source has 1 device(s), the destination 0"]);
    }

    fn from_json(text: &str) -> Result<HostDescriptor, String> {
        let d: HostDescriptor = serde_json::from_str(text)
            .map_err(|e| format!("not a compatibility descriptor: {e}"))?;
        d.check_format()?;
        Ok(d)
    }

    #[test]
    fn descriptors_round_trip_and_bad_ones_are_named() {
        let h = HostDescriptor {
            format: FORMAT.into(),
            host: "simulated amd".into(),
            iommu: "AMD-Vi (dirty tracking)".into(),
            devices: vec![dev("x", &[0xab], 5)],
        };
        let j = serde_json::to_string_pretty(&h).unwrap();
        assert!(j.contains("\"compat\": \"ab\""), "{j}");
        assert_eq!(from_json(&j).unwrap(), h);
        let e = from_json("{}").unwrap_err();
        assert!(e.starts_with("not a compatibility descriptor"), "{e}");
        let e = from_json(&j.replace(FORMAT, "other/9")).unwrap_err();
        assert!(e.contains("\"other/9\""), "{e}");
        let e = from_json(&j.replace("\"ab\"", "\"zz\"")).unwrap_err();
        assert!(e.contains("invalid hex"), "{e}");
    }
}
