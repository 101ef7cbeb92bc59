import BlockEngine

/// Opens an image file as a `BlockDevice`: probes (or takes) the format, locks, validates,
/// and follows backing files with a depth limit.
public enum ImageOpener {
    public static let maxChainDepth = 16

    public struct Options: Sendable {
        public var writable: Bool
        public var format: ImageFormat?
        public var lock: Bool
        public init(writable: Bool, format: ImageFormat? = nil, lock: Bool = true) {
            self.writable = writable; self.format = format; self.lock = lock
        }
    }

    public static func open(path: String, options: Options) throws -> BlockDevice {
        try open(path: path, options: options, depth: 0)
    }

    static func open(path: String, options: Options, depth: Int) throws -> BlockDevice {
        if depth > maxChainDepth {
            throw BlockError.invalid(file: path, field: "backing chain", detail: "deeper than \(maxChainDepth) images (a loop?)")
        }
        let file = try ImageFile(path: path, writable: options.writable)
        if options.lock { try ImageLock.acquire(file, writable: options.writable) }
        let format = try options.format ?? ImageFormat.probe(file)
        switch format {
        case .raw:
            return BlockDevice(driver: try RawDriver(file: file))
        }
    }
}
