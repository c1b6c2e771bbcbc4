//! Plain guest memory for the model.

use std::sync::Mutex;

use super::{Dma, DmaError, lock};

/// `size` bytes of memory at `base`, addressed directly (IOVA = guest physical address).
#[derive(Debug)]
pub struct FlatMemory {
    base: u64,
    bytes: Mutex<Vec<u8>>,
}

impl FlatMemory {
    /// Zeroed memory.
    pub fn new(base: u64, size: usize) -> FlatMemory {
        FlatMemory {
            base,
            bytes: Mutex::new(vec![0; size]),
        }
    }

    /// First address.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// A copy of the whole memory.
    pub fn snapshot(&self) -> Vec<u8> {
        lock(&self.bytes).clone()
    }

    /// Replace the contents (a migration copy of guest RAM); `false` if the sizes differ.
    pub fn restore(&self, image: &[u8]) -> bool {
        let mut g = lock(&self.bytes);
        if g.len() != image.len() {
            return false;
        }
        g.copy_from_slice(image);
        true
    }

    fn range(
        &self,
        iova: u64,
        len: usize,
        write: bool,
    ) -> Result<core::ops::Range<usize>, DmaError> {
        let err = DmaError { iova, write };
        let off = usize::try_from(iova.checked_sub(self.base).ok_or(err)?).map_err(|_| err)?;
        let end = off.checked_add(len).ok_or(err)?;
        if end > lock(&self.bytes).len() {
            return Err(err);
        }
        Ok(off..end)
    }
}

impl Dma for FlatMemory {
    fn read(&self, iova: u64, buf: &mut [u8]) -> Result<(), DmaError> {
        let r = self.range(iova, buf.len(), false)?;
        buf.copy_from_slice(&lock(&self.bytes)[r]);
        Ok(())
    }

    fn write(&self, iova: u64, data: &[u8]) -> Result<(), DmaError> {
        let r = self.range(iova, data.len(), true)?;
        lock(&self.bytes)[r].copy_from_slice(data);
        Ok(())
    }
}
