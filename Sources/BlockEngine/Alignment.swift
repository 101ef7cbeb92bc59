extension UInt64 {
    /// Rounds up to a multiple of a power-of-two `alignment`; callers bound self first.
    @inlinable public func alignedUp(_ alignment: UInt64) -> UInt64 { (self + alignment - 1) & ~(alignment - 1) }
    @inlinable public func alignedDown(_ alignment: UInt64) -> UInt64 { self & ~(alignment - 1) }
    @inlinable public var isPowerOfTwo: Bool { self != 0 && (self & (self - 1)) == 0 }
}
