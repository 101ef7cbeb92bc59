import CIsal

/// CRC-32C (Castagnoli), as VHDX checksums its structures.
func crc32c(_ bytes: [UInt8]) -> UInt32 {
    bytes.withUnsafeBytes { UInt32(rm_crc32c($0.baseAddress, Int32($0.count))) }
}

/// CRC-32C of `bytes` with the 4-byte checksum field at `at` taken as zeros.
func crc32c(_ bytes: [UInt8], zeroing at: Int) -> UInt32 {
    var b = bytes
    for i in at ..< at + 4 { b[i] = 0 }
    return crc32c(b)
}
