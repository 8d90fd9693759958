/* eventpipe beacon: placeholder, see issue 8 */
