import BlockEngine

extension ImageFormat { public static let qed = ImageFormat(name: "qed") }

/// QED in the format registry: read and written; a backing file is probed unless the
/// header says it is raw (no-probe feature).
enum QEDFormat: FormatOpening {
    static let format = ImageFormat.qed
    static let writes = true
    static func probe(_ head: [UInt8]) -> Bool { QEDHeader.probe(head) }

    static func open(_ r: OpenRequest) throws -> BlockDevice {
        let driver = try QEDDriver(file: r.file) { report in r.note("image was not closed cleanly (NEED_CHECK); checked: \(report)") }
        var backing: BlockDevice? = nil
        if let name = driver.backingName {
            let noProbe = driver.header.features & QEDHeader.featureBackingNoProbe != 0
            backing = try r.backing(name, format: noProbe ? .raw : nil)
        }
        return BlockDevice(driver: driver, backing: backing)
    }
}
