import BlockEngine
import Glibc

/// Bochs sparse image, read-only. A page is either in this file (page table entry = its
/// physical page number) or not here: then the parent answers (Bochs stacks sparse images
/// by name, see `parentPath`), or zeros. The page table is read in chunks through the
/// shared table cache; runs of pages that are contiguous on the host map as one range.
public final class BochsSparseDriver: ImageDriver {
    public let file: ImageFile
    public let info: ImageInfo
    public var readOnlyReason: String? { "Bochs images are always read-only" }
    public let header: BochsSparseHeader

    let pageTable: FlatTable
    let fileSize: UInt64
    /// Longest run one `map` call assembles, so a call stays cheap on huge requests.
    static let maxPagesPerMap = 256

    /// Pages are only ever appended, so the file's length past `dataStart` says how many are
    /// allocated: a stat answers at once while the count reads the page table (32 MiB at 8 TiB).
    public var allocatedBytesHint: UInt64? {
        let page = UInt64(header.pageSize)
        guard fileSize > header.dataStart else { return 0 }
        return min((fileSize - header.dataStart) / page * page, info.virtualSize)
    }

    public init(file: ImageFile) throws {
        let h = try BochsSparseHeader.read(from: file)
        self.file = file
        header = h
        fileSize = try file.size()
        pageTable = FlatTable(file: file, start: BochsSparseHeader.headerSize, entries: UInt64(h.pages),
                              encoding: .u32LE, fileSize: fileSize)
        info = ImageInfo(format: "bochs", virtualSize: h.diskSize, clusterSize: UInt64(h.pageSize), details: [
            ("type", "sparse"),
            ("version", "\(h.version)"),
            ("page size", "\(h.pageSize)"),
            ("pages", "\(h.pages)"),
        ])
    }

    /// The image Bochs stacks this one on: when the file name ends in a digit 1-9, the same
    /// name with that digit one lower (disk.img2 over disk.img1 over disk.img0), if it exists.
    public static func parentPath(of path: String) -> String? {
        guard let last = path.unicodeScalars.last, ("1"..."9").contains(last) else { return nil }
        let parent = String(path.unicodeScalars.dropLast()) + String(UnicodeScalar(last.value - 1)!)
        return access(parent, F_OK) == 0 ? parent : nil
    }

    /// Guest bytes `[offset, end)` of page `page`, whose page table entry is `physical`.
    private func mapPage(_ page: UInt64, physical: UInt64, from offset: UInt64, to end: UInt64) throws -> Mapping {
        let size = UInt64(header.pageSize)
        if physical == UInt64(BochsSparseHeader.notAllocated) { return .unallocated(length: end - offset) }
        let start = header.dataStart + physical * size
        guard start + size <= fileSize else {
            throw BlockError.invalid(file: file.path, field: "page table entry \(page)",
                                     detail: "physical page \(physical) lies outside the \(fileSize)-byte file")
        }
        return .data(host: start + offset - page * size, length: end - offset)
    }

    public func map(_ offset: UInt64, maxLength: UInt64) throws -> Mapping {
        let size = UInt64(header.pageSize), end = offset + maxLength
        // A run of pages not here is passed whole (the page table a cached chunk at a time):
        // an 8 TiB image of 1 MiB pages has 8 Mi entries, and status walks cross them all.
        let first = offset / size
        if try pageTable.entry(first) == UInt64(BochsSparseHeader.notAllocated) {
            let run = try pageTable.run(of: UInt64(BochsSparseHeader.notAllocated), from: first, limit: (end + size - 1) / size - first)
            return .unallocated(length: min(end, (first + max(run, 1)) * size) - offset)
        }
        return try pageTable.mapRun(from: offset, to: end, unit: size, maxPieces: Self.maxPagesPerMap) { physical, page, pos, n in
            try mapPage(page, physical: physical, from: pos, to: pos + n)
        }
    }

    public func close() throws {}
}
