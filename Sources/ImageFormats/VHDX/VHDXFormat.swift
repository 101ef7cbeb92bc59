import BlockEngine

extension ImageFormat { public static let vhdx = ImageFormat(name: "vhdx") }

/// VHDX in the format registry: probes by its file identifier; dynamic and fixed images
/// are written, differencing ones refused.
enum VHDXFormat: FormatOpening {
    static let format = ImageFormat.vhdx
    static let writes = true
    static func probe(_ head: [UInt8]) -> Bool { VHDXHeader.probe(head) }
    static func open(_ r: OpenRequest) throws -> BlockDevice { BlockDevice(driver: try VHDXDriver(file: r.file) { r.note($0) }) }
}
