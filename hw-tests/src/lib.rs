//! The parts of `hw-tests` other tools reuse: the lab configuration format.
#![deny(missing_docs)]

pub mod lab_config;
