import BlockEngine

/// A raw image: guest offset == host offset. Holes in the host file read as zeros and are
/// reported as holes; zeroing punches or zero-ranges the host file.
public final class RawDriver: ImageDriver {
    public let file: ImageFile
    public let info: ImageInfo
    public var isWritable: Bool { file.isWritable }

    /// Raw has no clusters; this is what st_blksize advertises.
    public static let preferredIOSize: UInt64 = 64 * 1024

    public init(file: ImageFile) throws {
        self.file = file
        let size = try file.size()
        info = ImageInfo(format: "raw", virtualSize: size, clusterSize: RawDriver.preferredIOSize)
    }

    public func map(_ offset: UInt64, maxLength: UInt64) throws -> Mapping {
        .data(host: offset, length: maxLength)
    }

    public func status(_ offset: UInt64, maxLength: UInt64) throws -> Mapping {
        let end = offset + maxLength
        guard let dataAt = try file.seek(offset, data: true), dataAt < end else { return .zero(length: maxLength) }
        if dataAt > offset { return .zero(length: dataAt - offset) }
        let holeAt = try file.seek(offset, data: false) ?? end
        return .data(host: offset, length: min(max(holeAt, offset + 1), end) - offset)
    }

    public func zeroRange(_ offset: UInt64, length: UInt64, deallocate: Bool) throws -> (offset: UInt64, length: UInt64) {
        // Punch first when asked to deallocate; otherwise keep the blocks if the host can.
        if deallocate, try file.punchHole(offset: offset, length: length) { return (offset, length) }
        if try file.zeroRange(offset: offset, length: length) { return (offset, length) }
        if !deallocate, try file.punchHole(offset: offset, length: length) { return (offset, length) }
        return (offset, 0) // the engine writes zeros
    }

    public func flush() throws { try file.sync() }
    public func close() throws { try file.sync() }
}
