import BlockEngine

extension ImageFormat { public static let vpc = ImageFormat(name: "vpc") }

/// VHD in the format registry, under QEMU's name (`vpc`): dynamic images probe by their
/// footer copy at the start; a fixed image probes as raw (as in QEMU) and opens with
/// `--format vpc`. Fixed and dynamic images are written; differencing ones are refused.
enum VHDFormat: FormatOpening {
    static let format = ImageFormat.vpc
    static let writes = true
    static func probe(_ head: [UInt8]) -> Bool { VHDFooter.probe(head) }
    static func open(_ r: OpenRequest) throws -> BlockDevice { BlockDevice(driver: try VHDDriver(file: r.file)) }
}
