import BlockEngine
#if canImport(Glibc)
import Glibc
#endif

/// Split raw evidence (image.001, image.002, ...): the pieces, in order, are one disk.
/// Every piece but the last has the same size, and the last is no larger. Each byte maps
/// in place into its piece (host addresses carry the piece number, so a run never crosses
/// into the next piece); holes in a piece read as zeros and are reported as holes.
public final class SplitRawDriver: MultiFileMapping, ImageAllocating {
    public let file: ImageFile
    public let info: ImageInfo
    public let pieces: [ImageFile]
    /// Where each piece starts on the disk.
    let starts: [UInt64]
    /// Found by its name rather than asked for (`--format splitraw`): evidence, so read-only.
    let detected: Bool
    public var isWritable: Bool { !detected && pieces.allSatisfy(\.isWritable) }
    public var readOnlyReason: String? {
        if detected { return "split raw evidence is served read-only (--format splitraw writes to it)" }
        return pieces.allSatisfy(\.isWritable) ? nil : "a piece lies outside the folder of the first one"
    }
    public var contributingFiles: [ImageFile] { pieces }
    public var hostAllocatedBytes: UInt64 { pieces.reduce(0) { $0 + $1.allocatedBytes() } }
    public func hostFile(_ index: Int) -> ImageFile { pieces[index] }

    public init(pieces: [ImageFile], names: [String], detected: Bool) throws {
        precondition(!pieces.isEmpty)
        file = pieces[0]
        self.pieces = pieces
        self.detected = detected
        let sizes = try pieces.map { try $0.size() }
        // Equal pieces, the last one no larger (what split, FTK Imager and ewfexport write).
        // The piece size is the one most pieces before the last have (the first piece's on a
        // tie), so the damaged piece is the one named, the first one included.
        var tally: [UInt64: Int] = [:]
        for size in sizes.dropLast() { tally[size, default: 0] += 1 }
        let most = tally.values.max() ?? 0
        let reference = tally[sizes[0]] == most || sizes.count == 1 ? sizes[0] : tally.first { $0.value == most }!.key
        for (i, size) in sizes.enumerated().dropLast() where size != reference {
            throw BlockError.invalid(file: names[i], field: "split raw piece size",
                                     detail: "\(size) bytes where the other pieces have \(reference) (a damaged or foreign piece)")
        }
        if let last = sizes.last, pieces.count > 1, last > reference || last == 0 {
            throw BlockError.invalid(file: names[names.count - 1], field: "split raw piece size",
                                     detail: "\(last) bytes after pieces of \(reference) (from \(PathName.baseName(names[0]).escapingControls)): the last piece must be no larger, and not empty")
        }
        var starts: [UInt64] = [], total: UInt64 = 0
        for size in sizes {
            starts.append(total)
            let (sum, overflow) = total.addingReportingOverflow(size)
            guard !overflow, size <= HostAddress.offsetMask else {
                throw BlockError.invalid(file: names[0], field: "split raw size", detail: "the pieces add up to more than a disk can be")
            }
            total = sum
        }
        self.starts = starts
        try VirtualSize.checked(total, file: names[0], field: "split raw size", sectors: false)
        info = ImageInfo(format: "splitraw", virtualSize: total, clusterSize: RawDriver.preferredIOSize, details: [
            ("pieces", "\(pieces.count) of \(sizes[0]) bytes" + (pieces.count > 1 && sizes.last != sizes[0] ? " (the last \(sizes.last!))" : "")),
            ("last piece", PathName.baseName(names[names.count - 1]).escapingControls),
        ], hasClusters: false)
    }

    /// The piece holding disk byte `offset`, and where that piece ends on the disk.
    @inline(__always)
    private func piece(at offset: UInt64) -> (index: Int, end: UInt64) {
        let i = starts.partitionIndex { $0 > offset } - 1
        return (i, i + 1 < starts.count ? starts[i + 1] : info.virtualSize)
    }

    public func map(_ offset: UInt64, maxLength: UInt64) throws -> Mapping {
        let (i, end) = piece(at: offset)
        return .data(host: HostAddress(file: i, offset: offset - starts[i]).packed, length: min(maxLength, end - offset))
    }

    /// Holes of the piece's host file, as for a raw image.
    public func status(_ offset: UInt64, maxLength: UInt64) throws -> Mapping {
        let (i, end) = piece(at: offset)
        let f = pieces[i], at = offset - starts[i], n = min(maxLength, end - offset)
        guard let dataAt = try f.seek(at, data: true), dataAt < at + n else { return .zero(length: n) }
        if dataAt > at { return .zero(length: dataAt - at) }
        let holeAt = try f.seek(at, data: false) ?? at + n
        return .data(host: HostAddress(file: i, offset: at).packed, length: min(max(holeAt, at + 1), at + n) - at)
    }

    // Every byte is in place: nothing is ever allocated.
    public func allocate(_ offset: UInt64, length: UInt64) throws -> Allocation {
        throw BlockError.unsupported(file: file.path, feature: "allocation in split raw pieces (every byte is in place)")
    }
    public func commit(_ allocation: Allocation) throws {
        throw BlockError.unsupported(file: file.path, feature: "allocation in split raw pieces (every byte is in place)")
    }

    public func flush() throws {
        guard isWritable else { return }
        for p in pieces { try p.sync() }
    }

    public func close() throws { try flush() }
}
