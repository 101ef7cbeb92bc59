import BlockEngine

extension ImageFormat { public static let qcow2 = ImageFormat(name: "qcow2") }

/// qcow2 in the format registry: read and written, internal snapshots shown read-only;
/// the backing-format extension names the backing file's format (probed without it).
enum QCOW2Format: FormatOpening {
    static let format = ImageFormat.qcow2
    static let writes = true
    static let hasSnapshots = true
    static func probe(_ head: [UInt8]) -> Bool { QCOW2Header.probe(head) }

    static func open(_ r: OpenRequest) throws -> BlockDevice {
        let driver = try QCOW2Driver(file: r.file, snapshot: r.options.snapshot) { note in r.note(note) }
        var backing: BlockDevice? = nil
        if let name = driver.header.backingName {
            backing = try r.backing(name, format: driver.header.backingFormat.flatMap { ImageFormat(rawValue: $0) })
        }
        return BlockDevice(driver: driver, backing: backing)
    }
}
