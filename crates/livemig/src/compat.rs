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
    /// The device's DMA-logging limits, when it has a DMA log and they were probed
    /// (`livemig probe --open`); absent otherwise and in older descriptors.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dma_logging_limits: Option<DmaLoggingLimits>,
}

/// What a device's DMA log can do (`VFIO_DEVICE_FEATURE_DMA_LOGGING_START`, vfio.h).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DmaLoggingLimits {
    /// The granularity the device chose when asked for 4 KiB (START returns the page size it
    /// uses; a driver may round the hint up).
    pub page_size: u64,
    /// How many IOVA ranges one START takes: the kernel's `LOG_MAX_RANGES` (`PAGE_SIZE / 16`,
    /// vfio_main.c), or less for a driver known to track fewer.
    pub max_ranges: u32,
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
        check_format(&self.format)
    }
}

/// Checks a descriptor's format tag: [`FORMAT`] is read; a later `livemig-compat/N` is
/// refused as written by a newer livemig (its fields may mean something this one does not
/// know), anything else as not a descriptor.
pub fn check_format(format: &str) -> Result<(), String> {
    if format == FORMAT {
        return Ok(());
    }
    let ours: u32 = FORMAT
        .rsplit_once('/')
        .and_then(|(_, n)| n.parse().ok())
        .unwrap_or(1);
    match format
        .strip_prefix("livemig-compat/")
        .and_then(|n| n.parse::<u32>().ok())
    {
        Some(n) if n > ours => Err(format!(
            "descriptor format {format:?} was written by a newer livemig; this one reads \
             {FORMAT:?}: upgrade livemig here or export with the older one"
        )),
        _ => Err(format!("descriptor format {format:?} is not {FORMAT:?}")),
    }
}

/// The fields a [`FORMAT`] descriptor may have, at the top level, in a device, and in a
/// device's `dma_logging_limits`. A field outside them comes from a newer livemig (or an
/// edit) and is refused rather than ignored: a compatibility check must not pass by skipping
/// what it does not understand.
pub const KNOWN_FIELDS: (&[&str], &[&str], &[&str]) = (
    &["format", "host", "iommu", "devices"],
    &[
        "identity",
        "compat",
        "migration_flags",
        "dma_logging",
        "iommu_dirty_tracking",
        "page_size_mask",
        "migration_flags_known",
        "dma_logging_limits",
    ],
    &["page_size", "max_ranges"],
);

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
        // A block that is text says what differs in words (e.g. the KVM vCPU state device's
        // "vCPU state: XSAVE/XCR0 ..."): that reason comes first, before the identities.
        if sd.compat != dd.compat {
            v.reasons.push(match (text(&sd.compat), text(&dd.compat)) {
                (Some(a), Some(b)) => format!(
                    "device {i} ({}): {a} on the source; {b} on the destination",
                    sd.identity
                ),
                _ => format!(
                    "device {i} ({}): compatibility block differs (source {}, destination {})",
                    sd.identity,
                    show(&sd.compat),
                    show(&dd.compat)
                ),
            });
        }
        if sd.identity != dd.identity {
            v.reasons.push(format!(
                "device {i}: identity {:?} on the source, {:?} on the destination",
                sd.identity, dd.identity
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
        if let (Some(sl), Some(dl)) = (s.dma_logging_limits, d.dma_logging_limits) {
            if dl.page_size > sl.page_size {
                v.notes.push(format!(
                    "device {i} ({}): the destination's DMA log is coarser ({} KiB pages, the \
                     source's {} KiB): a later migration from there sends more per write",
                    sd.identity,
                    dl.page_size >> 10,
                    sl.page_size >> 10
                ));
            }
            if dl.max_ranges < sl.max_ranges {
                v.notes.push(format!(
                    "device {i} ({}): the destination's DMA log takes {} ranges, the source's \
                     {}: guest RAM is covered with fewer, larger ranges there",
                    sd.identity, dl.max_ranges, sl.max_ranges
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
/// The block as printable one-line text, if it is that.
fn text(b: &[u8]) -> Option<&str> {
    match std::str::from_utf8(b) {
        Ok(t) if !t.is_empty() && t.chars().all(|c| c == ' ' || c.is_ascii_graphic()) => Some(t),
        _ => None,
    }
}

fn show(b: &[u8]) -> String {
    match text(b) {
        Some(t) => format!("{t:?}"),
        None => hex(b),
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
            dma_logging_limits: None,
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
                "bar2 0x8000 mem64 prefetchable on the source; bar2 0x10000 mem64 prefetchable \
                 on the destination"
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

    #[test]
    fn dma_logging_limits_are_optional_compared_and_noted() {
        let mut a = [dev("pci 15b3:101e mlx5_vfio_pci", b"", 5)];
        a[0].device.dma_logging = true;
        let mut b = a.clone();
        let j = serde_json::to_string(&a[0]).unwrap();
        assert!(
            !j.contains("dma_logging_limits"),
            "absent when not probed: {j}"
        );
        a[0].dma_logging_limits = Some(DmaLoggingLimits {
            page_size: 4096,
            max_ranges: 256,
        });
        b[0].dma_logging_limits = Some(DmaLoggingLimits {
            page_size: 2 << 20,
            max_ranges: 32,
        });
        let v = check(&a, &b);
        assert!(v.compatible, "{v:?}");
        assert!(
            v.notes[0].contains("coarser (2048 KiB pages, the source's 4 KiB)"),
            "{v:?}"
        );
        assert!(
            v.notes[1].contains("takes 32 ranges, the source's 256"),
            "{v:?}"
        );
        assert!(check(&b, &a).notes.is_empty(), "finer is not worth a note");
        let j = serde_json::to_string(&b[0]).unwrap();
        let back: DeviceDescriptor = serde_json::from_str(&j).unwrap();
        assert_eq!(back, b[0]);
    }

    /// The known-field lists match what a descriptor with every optional part serialises to.
    #[test]
    fn known_fields_are_exactly_the_serialised_ones() {
        let mut d = dev("x", &[1], 5);
        d.dma_logging_limits = Some(DmaLoggingLimits {
            page_size: 4096,
            max_ranges: 1,
        });
        let h = HostDescriptor {
            format: FORMAT.into(),
            host: "h".into(),
            iommu: "i".into(),
            devices: vec![d],
        };
        let v = serde_json::to_value(&h).unwrap();
        let keys = |o: &serde_json::Value| {
            let mut k: Vec<String> = o.as_object().unwrap().keys().cloned().collect();
            k.sort();
            k
        };
        let sorted = |l: &[&str]| {
            let mut k: Vec<String> = l.iter().map(|s| s.to_string()).collect();
            k.sort();
            k
        };
        assert_eq!(keys(&v), sorted(KNOWN_FIELDS.0));
        assert_eq!(keys(&v["devices"][0]), sorted(KNOWN_FIELDS.1));
        assert_eq!(
            keys(&v["devices"][0]["dma_logging_limits"]),
            sorted(KNOWN_FIELDS.2)
        );
    }

    #[test]
    fn a_newer_format_is_named_as_such() {
        let e = check_format("livemig-compat/2").unwrap_err();
        assert!(e.contains("newer livemig"), "{e}");
        let e = check_format("livemig-compat/x").unwrap_err();
        assert!(e.contains("is not"), "{e}");
        let e = check_format("livemig-compat/0").unwrap_err();
        assert!(!e.contains("newer"), "{e}");
        check_format(FORMAT).unwrap();
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
