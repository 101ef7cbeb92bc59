/// One compressed cluster's share of a read buffer (disjoint from every other piece of the
/// same request): what `BlockDevice.read` hands a driver to inflate.
public struct CompressedPiece: @unchecked Sendable {
    public let mapping: Mapping
    /// Guest offset of the piece's first byte.
    public let guestOffset: UInt64
    /// Where the guest bytes go.
    public let piece: UnsafeMutableRawBufferPointer

    public init(mapping: Mapping, guestOffset: UInt64, piece: UnsafeMutableRawBufferPointer) {
        self.mapping = mapping; self.guestOffset = guestOffset; self.piece = piece
    }

    /// Each piece through the driver's one-cluster `readCompressed`, several at once.
    public static func readInParallel(_ pieces: [CompressedPiece], from driver: any ImageMapping) throws {
        try eachOnAllCores(pieces.count) { i in
            try driver.readCompressed(pieces[i].mapping, guestOffset: pieces[i].guestOffset, into: pieces[i].piece)
        }
    }
}
