//! CRC-32/Castagnoli (CRC32C): reflected polynomial 0x82F63B78, initial value and final XOR
//! 0xFFFFFFFF. With the `std` feature the `crc-fast` crate computes it (carry-less-multiply
//! folding with PCLMULQDQ / AVX-512 VPCLMULQDQ, or the ARMv8 CRC and PMULL instructions,
//! detected at run time); without it, a portable slice-by-8 table implementation does. Both
//! give identical results (tested).

/// Running CRC32C: `update` with consecutive pieces, then `finish`.
#[derive(Clone)]
pub struct Crc32c {
    #[cfg(feature = "std")]
    digest: crc_fast::Digest,
    #[cfg(not(feature = "std"))]
    state: u32,
}

impl core::fmt::Debug for Crc32c {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_tuple("Crc32c").field(&self.finish()).finish()
    }
}

impl Default for Crc32c {
    fn default() -> Crc32c {
        Crc32c::new()
    }
}

impl Crc32c {
    /// A fresh computation.
    pub fn new() -> Crc32c {
        Crc32c {
            #[cfg(feature = "std")]
            digest: crc_fast::Digest::new(crc_fast::CrcAlgorithm::Crc32Iscsi),
            #[cfg(not(feature = "std"))]
            state: 0,
        }
    }

    /// Adds bytes.
    #[inline]
    pub fn update(&mut self, data: &[u8]) {
        #[cfg(feature = "std")]
        self.digest.update(data);
        #[cfg(not(feature = "std"))]
        {
            self.state = software(self.state, data);
        }
    }

    /// The CRC of everything added so far (more may be added after).
    pub fn finish(&self) -> u32 {
        #[cfg(feature = "std")]
        {
            self.digest.finalize() as u32
        }
        #[cfg(not(feature = "std"))]
        {
            self.state
        }
    }
}

/// CRC32C of `data`.
pub fn crc32c(data: &[u8]) -> u32 {
    let mut c = Crc32c::new();
    c.update(data);
    c.finish()
}

const POLY: u32 = 0x82F6_3B78;

const fn tables() -> [[u32; 256]; 8] {
    let mut t = [[0u32; 256]; 8];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 { (c >> 1) ^ POLY } else { c >> 1 };
            k += 1;
        }
        t[0][i] = c;
        i += 1;
    }
    let mut i = 0;
    while i < 256 {
        let mut j = 1;
        while j < 8 {
            let prev = t[j - 1][i];
            t[j][i] = (prev >> 8) ^ t[0][(prev & 0xff) as usize];
            j += 1;
        }
        i += 1;
    }
    t
}

static TABLES: [[u32; 256]; 8] = tables();

/// The portable implementation (slice-by-8).
pub fn software(crc: u32, data: &[u8]) -> u32 {
    let t = &TABLES;
    let mut c = !crc;
    let mut chunks = data.chunks_exact(8);
    for ch in &mut chunks {
        let lo = u32::from_le_bytes([ch[0], ch[1], ch[2], ch[3]]) ^ c;
        let hi = u32::from_le_bytes([ch[4], ch[5], ch[6], ch[7]]);
        c = t[7][(lo & 0xff) as usize]
            ^ t[6][((lo >> 8) & 0xff) as usize]
            ^ t[5][((lo >> 16) & 0xff) as usize]
            ^ t[4][(lo >> 24) as usize]
            ^ t[3][(hi & 0xff) as usize]
            ^ t[2][((hi >> 8) & 0xff) as usize]
            ^ t[1][((hi >> 16) & 0xff) as usize]
            ^ t[0][(hi >> 24) as usize];
    }
    for &b in chunks.remainder() {
        c = (c >> 8) ^ t[0][((c ^ u32::from(b)) & 0xff) as usize];
    }
    !c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_value() {
        // The catalogue check value of CRC-32/ISCSI (CRC32C).
        assert_eq!(software(0, b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(b""), 0);
    }

    #[test]
    fn software_matches_hardware_and_appends() {
        let data: alloc::vec::Vec<u8> = (0..10_000u32).map(|i| (i * 7 + 3) as u8).collect();
        for split in [0, 1, 7, 8, 9, 4096, 9999] {
            let (a, b) = data.split_at(split);
            assert_eq!(software(software(0, a), b), crc32c(&data));
            assert_eq!(software(0, &data[..split]), crc32c(&data[..split]));
            let mut c = Crc32c::new();
            c.update(a);
            c.update(b);
            assert_eq!(c.finish(), crc32c(&data));
        }
    }
}
