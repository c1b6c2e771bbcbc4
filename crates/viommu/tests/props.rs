//! Random ATTACH/DETACH/MAP/UNMAP sequences over several endpoints: afterwards every listener
//! holds exactly the mappings of its endpoint's domain, bypass state agrees, and no call ever
//! covered the whole 2^64 space.

use std::sync::{Arc, Mutex};

use livemig_viommu::device::{DeviceConfig, VirtioIommu};
use livemig_viommu::listener::{Call, ListenerError, MapListener, Mapping, RecordingListener};
use livemig_viommu::proto::{ATTACH_F_BYPASS, Config, MAP_F_READ, MAP_F_WRITE, Request};
use proptest::prelude::*;

#[derive(Clone, Default)]
struct Shared(Arc<Mutex<RecordingListener>>);

impl MapListener for Shared {
    fn map(&mut self, m: &Mapping) -> Result<(), ListenerError> {
        self.0.lock().unwrap().map(m)
    }
    fn unmap(&mut self, m: &Mapping) -> Result<(), ListenerError> {
        self.0.lock().unwrap().unmap(m)
    }
    fn set_bypass(&mut self, b: bool) -> Result<(), ListenerError> {
        self.0.lock().unwrap().set_bypass(b)
    }
}

#[derive(Debug, Clone)]
enum Op {
    Attach(u32, u32, bool),
    Detach(u32, u32),
    Map(u32, u64, u64, u64),
    Unmap(u32, u64, u64),
    Bypass(bool),
}

fn op() -> impl Strategy<Value = Op> {
    // Small spaces so operations collide: 3 domains, 4 endpoints, 32 pages of IOVA, and
    // now and then a range at the very top of the 64-bit space.
    let page = |p: u64| {
        if p == 31 {
            u64::MAX - 0xfff
        } else {
            p * 0x1000
        }
    };
    prop_oneof![
        (0u32..3, 0u32..4, prop::bool::weighted(0.15)).prop_map(|(d, e, b)| Op::Attach(d, e, b)),
        (0u32..3, 0u32..4).prop_map(|(d, e)| Op::Detach(d, e)),
        (0u32..3, 0u64..32, 1u64..6, 0u64..64).prop_map(move |(d, s, n, g)| Op::Map(
            d,
            page(s),
            page(s).saturating_add(n * 0x1000 - 1),
            g * 0x1000
        )),
        (0u32..3, 0u64..32, 0u64..12).prop_map(move |(d, s, n)| Op::Unmap(
            d,
            page(s),
            page(s).saturating_add(n * 0x1000 + 0xfff)
        )),
        any::<bool>().prop_map(Op::Bypass),
        // The whole space.
        (0u32..3).prop_map(|d| Op::Map(d, 0, u64::MAX, 0)),
        (0u32..3).prop_map(|d| Op::Unmap(d, 0, u64::MAX)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(500))]

    #[test]
    fn listeners_mirror_the_model(ops in prop::collection::vec(op(), 1..120)) {
        let cfg = DeviceConfig {
            config: Config { input_range: (0, u64::MAX), ..DeviceConfig::default().config },
            ..DeviceConfig::default()
        };
        let mut dev = VirtioIommu::new(cfg).unwrap();
        let listeners: Vec<Shared> = (0..4).map(|_| Shared::default()).collect();
        for (i, l) in listeners.iter().enumerate() {
            dev.add_endpoint(i as u32, Some(Box::new(l.clone())), vec![]).unwrap();
        }
        for op in &ops {
            let req = match *op {
                Op::Attach(d, e, bypass) => Request::Attach {
                    domain: d,
                    endpoint: e,
                    flags: if bypass { ATTACH_F_BYPASS } else { 0 },
                    reserved: [0; 4],
                },
                Op::Detach(d, e) => Request::Detach { domain: d, endpoint: e },
                Op::Map(d, s, l, g) => Request::Map {
                    domain: d,
                    virt_start: s,
                    virt_end: l,
                    phys_start: g,
                    flags: MAP_F_READ | MAP_F_WRITE,
                },
                Op::Unmap(d, s, l) => Request::Unmap {
                    domain: d,
                    virt_start: s,
                    virt_end: l,
                    reserved: [0; 4],
                },
                Op::Bypass(b) => {
                    dev.write_bypass(u8::from(b));
                    continue;
                }
            };
            let _ = dev.request(&req);
        }
        for (e, l) in listeners.iter().enumerate() {
            let l = l.0.lock().unwrap();
            let want: Vec<Mapping> = dev
                .endpoint_domain(e as u32)
                .map(|d| dev.mappings(d).iter().flat_map(Mapping::pieces).collect())
                .unwrap_or_default();
            let got: Vec<Mapping> = l.mappings.values().copied().collect();
            prop_assert_eq!(got, want, "endpoint {}", e);
            prop_assert_eq!(Some(l.bypass), dev.endpoint_bypass(e as u32), "endpoint {} bypass", e);
            for c in &l.log {
                if let Call::Map(m) | Call::Unmap(m) = c {
                    prop_assert!(m.len().is_some(), "{} covers 2^64", m);
                }
            }
        }
        // The model itself never holds overlapping mappings.
        for d in dev.domains() {
            let m = dev.mappings(d);
            for w in m.windows(2) {
                prop_assert!(w[0].last < w[1].iova);
            }
        }
    }
}
