/// A set of cluster numbers for consistency checks, in pages allocated only where a cluster
/// is marked: memory follows the clusters the metadata references, not the file's size (a
/// 1 PiB sparse file with a few tables costs a few pages). Past `limitBytes` it throws.
public struct SparseBitmap {
    static let pageBits = 12                       // 4096 clusters per page, 512 bytes
    private var pages: [UInt64: [UInt64]] = [:]
    public private(set) var count: UInt64 = 0
    public let limitBytes: Int
    private let file: String

    public init(limitBytes: Int = 256 << 20, file: String) {
        self.limitBytes = limitBytes
        self.file = file
    }

    public var bytesUsed: Int { pages.count * ((1 << Self.pageBits) / 8 + 64) }

    /// Marks `cluster`; false if it was marked already.
    public mutating func insert(_ cluster: UInt64) throws -> Bool {
        let page = cluster >> UInt64(Self.pageBits)
        let bit = Int(cluster & ((1 << UInt64(Self.pageBits)) - 1))
        if pages[page] == nil {
            guard bytesUsed < limitBytes else {
                throw BlockError.invalid(file: file, field: "metadata",
                                         detail: "checking it needs more than \(limitBytes >> 20) MiB of cluster bitmaps (its tables reference clusters spread over too much of the file)")
            }
            pages[page] = [UInt64](repeating: 0, count: (1 << Self.pageBits) / 64)
        }
        let (w, b) = (bit / 64, UInt64(bit % 64))
        if pages[page]![w] & (1 << b) != 0 { return false }
        pages[page]![w] |= 1 << b
        count += 1
        return true
    }
}
