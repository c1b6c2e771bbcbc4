//! The iommufd selftest uAPI (mock IOMMU and devices) lives in livemig-iommufd's `selftest`
//! module (feature `selftest`), shared with `livemig probe`.

pub use livemig_iommufd::selftest::*;
