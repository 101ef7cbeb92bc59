import BlockEngine
#if canImport(Glibc)
import Glibc
#endif

/// A raw image: guest offset == host offset. Holes in the host file read as zeros and are
/// reported as holes; zeroing punches or zero-ranges the host file.
public final class RawDriver: ImageAllocating {
    public let file: ImageFile
    public let info: ImageInfo
    public var isWritable: Bool { file.isWritable }

    /// Raw has no clusters; this is what st_blksize advertises.
    public static let preferredIOSize: UInt64 = 64 * 1024

    /// Opened without --format raw: the format came from probing the file's first bytes.
    let probed: Bool

    public init(file: ImageFile, probed: Bool = false) throws {
        self.file = file
        self.probed = probed
        let size = try file.size()
        info = ImageInfo(format: "raw", virtualSize: size, clusterSize: RawDriver.preferredIOSize, hasClusters: false)
    }

    public func map(_ offset: UInt64, maxLength: UInt64) throws -> Mapping {
        .data(host: offset, length: maxLength)
    }

    /// The host file's allocation: st_blocks shows it at once while the first count (two
    /// lseeks per extent of a fragmented file) is still running, as qemu's raw driver shows it.
    public var allocatedBytesHint: UInt64? { min(file.allocatedBytes(), info.virtualSize) }

    public func status(_ offset: UInt64, maxLength: UInt64) throws -> Mapping {
        let end = offset + maxLength
        guard let dataAt = try file.seek(offset, data: true), dataAt < end else { return .zero(length: maxLength) }
        if dataAt > offset { return .zero(length: dataAt - offset) }
        let holeAt = try file.seek(offset, data: false) ?? end
        return .data(host: offset, length: min(max(holeAt, offset + 1), end) - offset)
    }

    // Every guest byte maps in place (`map` answers `.data` only), so nothing is allocated.
    public func allocate(_ offset: UInt64, length: UInt64) throws -> Allocation {
        throw BlockError.unsupported(file: file.path, feature: "allocation in a raw image (every byte is in place)")
    }
    public func commit(_ allocation: Allocation) throws {
        throw BlockError.unsupported(file: file.path, feature: "allocation in a raw image (every byte is in place)")
    }

    public func zeroRange(_ offset: UInt64, length: UInt64, deallocate: Bool) throws -> (offset: UInt64, length: UInt64) {
        // Punch first when asked to deallocate; otherwise keep the blocks if the host can.
        if deallocate, try file.punchHole(offset: offset, length: length) { return (offset, length) }
        if try file.zeroRange(offset: offset, length: length) { return (offset, length) }
        if !deallocate, try file.punchHole(offset: offset, length: length) { return (offset, length) }
        return (offset, 0) // the engine writes zeros
    }

    /// As QEMU does for a probed raw image: a write that would put another format's header
    /// into the first sector is refused (EPERM). Otherwise whatever the guest writes there
    /// (a QED header naming /etc/shadow as its backing file) would be trusted on the next
    /// probing open. `--format raw` allows it.
    public func checkWrite(_ data: UnsafeRawBufferPointer, at offset: UInt64) throws {
        guard probed, offset < 512, !data.isEmpty else { return }
        var sector = [UInt8](repeating: 0, count: 512)
        let have = try sector.withUnsafeMutableBytes { try file.readUpTo(into: $0, at: 0) }
        let end = min(512, offset + UInt64(data.count))
        sector.withUnsafeMutableBytes { s in
            s.baseAddress!.advanced(by: Int(offset)).copyMemory(from: data.baseAddress!, byteCount: Int(end - offset))
        }
        let length = max(have, Int(end))
        if let other = ImageFormat.nonRawName(head: Array(sector[0..<length])) {
            throw BlockError.io(file: file.path, operation: "write of a \(other) header into the first sector of an image probed as raw "
                                + "(it would be opened as \(other) next time; mount with --format raw to allow it)", offset: 0, errno: EPERM)
        }
    }

    public func flush() throws { try file.sync() }
    public func close() throws { try file.sync() }
}

/// st_blocks and `info`'s allocation for raw: the host's data extents, two lseeks each.
extension RawDriver: AllocationCounting {
    public func countAllocated(from: UInt64, to: UInt64, budget: inout WorkBudget) throws -> UInt64? {
        var pos = from, total: UInt64 = 0
        while pos < to {
            guard budget.spend() else { return nil }
            guard let data = try file.seek(pos, data: true), data < to else { break }
            let hole = min(to, max(try file.seek(data, data: false) ?? to, data + 1))
            total += hole - data
            pos = hole
        }
        return total
    }
}
